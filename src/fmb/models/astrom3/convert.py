"""`fmb convert astrom3`: the published AstroM3 weights (MeriDK/AstroM3, `AstroM3` module of
src/model.py, saved by PyTorchModelHubMixin as model.safetensors + config.json) to an fmb
checkpoint directory.

Every upstream key is mapped or knowingly dropped (the fixed sinusoidal table `pe`, checked
against fmb's), and every fmb key must be filled: anything else is an error listing the keys.
The architecture is read from the tensor shapes; the number of heads, the ProbSparse factor
and the pooling size from config.json when present (else the published 4, 5 and 4).
Upstream fed pre-standardised metadata, so the converted metadata statistics are the
identity (mean 0, std 1); fmb's missingness maps (absent upstream) start at zero.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fmb.data.surveys.astrom3 import CLASSES
from fmb.errors import CheckpointError
from fmb.models.astrom3.model import AstroM3, AstroM3ModelConfig, sinusoidal_positions
from fmb.models.astrom3.trainer import AstroM3Config
from fmb.train import checkpoint as ckpt

_INFORMER = "photometry_encoder.encoder.attn_layers."
_RENAMES = [  # (upstream pattern, fmb replacement)
    (r"^photometry_encoder\.enc_embedding\.value_embedding\.tokenConv\.", "photometry_encoder.token."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.attention\.query_projection\.", r"photometry_encoder.layers.\1.attention.query."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.attention\.key_projection\.", r"photometry_encoder.layers.\1.attention.key."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.attention\.value_projection\.", r"photometry_encoder.layers.\1.attention.value."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.attention\.out_projection\.", r"photometry_encoder.layers.\1.attention.out."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.conv1\.", r"photometry_encoder.layers.\1.ff1."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.conv2\.", r"photometry_encoder.layers.\1.ff2."),
    (r"^photometry_encoder\.encoder\.attn_layers\.(\d+)\.(norm[12])\.", r"photometry_encoder.layers.\1.\2."),
    (r"^photometry_encoder\.encoder\.norm\.", "photometry_encoder.norm."),
    (r"^metadata_encoder\.model\.0\.", "metadata_encoder.fc1."),
    (r"^metadata_encoder\.model\.3\.", "metadata_encoder.fc2."),
    (r"^(photometry|spectra|metadata)_proj\.", r"\1_proj."),
    (r"^fc\.", "head."),
]
_POSITIONS = "photometry_encoder.enc_embedding.position_embedding.pe"
_SCALES = ("logit_scale_ps", "logit_scale_sm", "logit_scale_mp")


def read_upstream(src: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and (if present) config.json of an upstream checkpoint file or directory."""
    src = Path(src)
    config: dict = {}
    if src.is_dir():
        if (src / "config.json").is_file():
            config = json.loads((src / "config.json").read_text())
        files = [src / name for name in ("model.safetensors", "pytorch_model.bin") if (src / name).is_file()]
        if not files:
            raise CheckpointError(f"{src} holds neither model.safetensors nor pytorch_model.bin")
        src = files[0]
    state = ckpt.read_foreign(src)
    if not isinstance(state, dict):
        raise CheckpointError(f"{src} does not hold a dictionary of weights")
    return state.get("state_dict", state), config


def model_config(state: dict[str, torch.Tensor], config: dict) -> AstroM3ModelConfig:
    """fmb's model settings from upstream tensor shapes (and config.json for the rest)."""
    try:
        token = state["photometry_encoder.enc_embedding.value_embedding.tokenConv.weight"]
        d_model = token.shape[0]
        layers = {int(k[len(_INFORMER):].split(".")[0]) for k in state if k.startswith(_INFORMER)}
        convs = sorted((int(k.split(".")[2]), v) for k, v in state.items()
                       if k.startswith("spectra_encoder.layers.") and k.endswith(".weight"))
        cfg = AstroM3ModelConfig(
            mode="all" if "fc.weight" in state else "clip",
            embed_dim=state["photometry_proj.weight"].shape[0],
            seq_len=state["photometry_proj.weight"].shape[1] // d_model,
            d_model=d_model,
            n_heads=int(config.get("p_n_heads", 4)),
            n_layers=len(layers),
            d_ff=state[f"{_INFORMER}0.conv1.weight"].shape[0],
            factor=int(config.get("p_factor", 5)),
            conv_channels=[int(w.shape[0]) for _, w in convs],
            kernel_size=int(convs[0][1].shape[2]),
            pool_size=int(config.get("s_mp_kernel_size", 4)),
            m_hidden=state["metadata_encoder.model.0.weight"].shape[0],
        )
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"not an AstroM3 state dict in the upstream layout: no tensor {exc}") from None
    if token.shape[1] != 9:
        raise CheckpointError(f"upstream photometry input has {token.shape[1]} channels; fmb's Informer takes 9")
    if "fc.weight" in state and state["fc.weight"].shape[1] == 3 * cfg.embed_dim:
        cfg.fusion = "concat"
    return cfg


def map_state(state: dict[str, torch.Tensor], model: AstroM3) -> dict[str, torch.Tensor]:
    """Upstream keys -> fmb keys; raises listing every key that has no place."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == _POSITIONS:
            expected = sinusoidal_positions(value.shape[1], value.shape[2])
            if not torch.allclose(value[0].float(), expected, atol=1e-4):
                raise CheckpointError(f"{key} is not the standard sinusoidal table fmb computes")
            continue
        if key in _SCALES:
            continue
        for pattern, replacement in _RENAMES:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                if re.match(r"photometry_encoder\.layers\.\d+\.ff[12]\.weight$", new):
                    value = value.squeeze(-1)  # kernel-1 Conv1d == Linear
                out[new] = value
                break
        else:
            match = re.match(r"^spectra_encoder\.layers\.(\d+)\.(weight|bias)$", key)
            if match and int(match.group(1)) % 3 == 0:  # conv, ReLU, pool repeat: convs sit at 0, 3, 6, ...
                out[f"spectra_encoder.convs.{int(match.group(1)) // 3}.{match.group(2)}"] = value
            else:
                unknown.append(key)
    if all(name in state for name in _SCALES) and model.cfg.mode == "clip":
        out["logit_scale"] = torch.stack([state[name].reshape(()) for name in _SCALES])
    if unknown:
        raise CheckpointError(f"upstream keys with no place in fmb's AstroM3: {', '.join(sorted(unknown)[:12])}")
    fresh = model.state_dict()
    # Not in upstream: identity statistics, and missingness maps at their zero start (complete
    # data then gives the published network exactly).
    for key in ("meta_mean", "meta_std", "meta_used", "feature_missing.weight", "metadata_encoder.missing.weight"):
        if key in fresh:
            out.setdefault(key, fresh[key])
    return out


def convert(src: Path, out_dir: Path) -> Path:
    state, config = read_upstream(src)
    cfg = AstroM3Config()
    cfg.model = model_config(state, config)
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else len(CLASSES)
    if num_classes != len(CLASSES):
        raise CheckpointError(f"upstream classifier has {num_classes} classes; fmb's AstroM3 sample has {len(CLASSES)}")
    model = AstroM3(cfg.model, num_classes=num_classes)
    ckpt.load_state_strict(model, map_state(state, model), f"{src} (mapped to fmb keys)")
    return ckpt.write_converted(Path(out_dir), "astrom3", model, cfg, converted_from=str(src),
                                note="upstream inputs were pre-standardised: metadata statistics set to mean 0, std 1")
