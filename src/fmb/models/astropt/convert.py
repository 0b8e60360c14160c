"""`fmb convert astropt SRC.pt --out DIR`: an upstream AstroPT checkpoint -> an fmb checkpoint directory.

Upstream checkpoints are pickles that hold `astropt.model.ModalityConfig` / `ModalityRegistry`
objects. They are read by fmb's one reader of upstream checkpoints (`checkpoint.read_foreign`)
with an allow-list that maps those two classes onto plain stand-ins; anything else is refused:
nothing in the file can run code, and the `astropt` package is not needed. Both key layouts are understood: 2.x
(`transformer.wte/wpe.<mod>`, `lm_head.<mod>`) and 3.x (`encoders/embedders/decoders.<mod>`),
with or without `module.` / `_orig_mod.` prefixes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fmb.errors import CheckpointError
from fmb.models.astropt.model import Modality
from fmb.models.astropt.trainer import FAMILY, AstroPTConfig, AstroPTModelConfig, build_astropt
from fmb.train import checkpoint as ckpt


class UpstreamModalityConfig:
    """Stand-in for astropt.model.ModalityConfig (attributes only)."""


class UpstreamModalityRegistry:
    """Stand-in for astropt.model.ModalityRegistry (attributes only)."""


_ALLOWED = {("astropt.model", "ModalityConfig"): UpstreamModalityConfig,
            ("astropt.model", "ModalityRegistry"): UpstreamModalityRegistry}

# (pattern, replacement), applied in order to wrapper-free upstream keys.
_KEY_RULES = [
    (r"^transformer\.wte\.", "encoders."),
    (r"^transformer\.wpe\.", "embedders."),
    (r"^lm_head\.", "decoders."),
    (r"^transformer\.h\.", "blocks."),
    (r"^transformer\.ln_f\.", "ln_f."),
    (r"^(embedders\.[^.]+)\.wpe\.", r"\1.table."),
    (r"^(encoders|embedders|decoders)\.([^.]+)\.c_fc\.", r"\1.\2.fc."),
    (r"^(encoders|embedders|decoders)\.([^.]+)\.c_proj\.", r"\1.\2.proj."),
    (r"\.attn\.c_attn\.", ".attn.qkv."),
    (r"\.attn\.c_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc."),
    (r"\.mlp\.c_proj\.", ".mlp.proj."),
]


def read_upstream(path: Path) -> dict[str, Any]:
    raw = ckpt.read_foreign(path, _ALLOWED)
    if not isinstance(raw, dict) or "model" not in raw or not isinstance(raw["model"], dict):
        raise CheckpointError(f"{path} is not an AstroPT checkpoint (no 'model' state dict)")
    return raw


def map_key(key: str) -> str:
    key = ckpt.clean_key(key)
    for pattern, replacement in _KEY_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def upstream_modalities(raw: dict[str, Any], path: Path) -> list[Modality]:
    entries = (raw.get("model_args") or {}).get("modalities")
    if not entries and raw.get("modality_registry") is not None:
        entries = list(vars(raw["modality_registry"]).get("modalities", {}).values())
    if not entries:
        raise CheckpointError(f"{path}: no modality configuration (model_args['modalities'] or modality_registry)")
    out = []
    for entry in entries:
        fields = vars(entry) if not isinstance(entry, dict) else entry
        try:
            out.append(Modality(
                name=fields["name"], input_size=int(fields["input_size"]), patch_size=int(fields["patch_size"]),
                positions="index" if fields["embed_pos"] else "float", pos_input_size=int(fields["pos_input_size"]),
                loss_weight=float(fields.get("loss_weight", 1.0)),
            ))
        except KeyError as exc:
            raise CheckpointError(f"{path}: modality entry without field {exc}") from None
    return out


def convert(src: Path, out: Path) -> Path:
    src, out = Path(src), Path(out)
    if src.is_dir():
        raise CheckpointError(f"{src} is a directory; give the upstream .pt file (an fmb checkpoint needs no conversion)")
    raw = read_upstream(src)
    state = {map_key(k): v for k, v in raw["model"].items()}
    lora = [k for k in state if "lora_" in k]
    if lora:
        raise CheckpointError(f"{src} holds LoRA adapter weights ({lora[0]}, ...): merge them into the base weights first")
    args = raw.get("model_args") or {}
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if k not in args]
    if missing:
        raise CheckpointError(f"{src}: model_args lacks {', '.join(missing)}")
    model_cfg = AstroPTModelConfig(
        preset=None, n_layer=int(args["n_layer"]), n_head=int(args["n_head"]), n_embd=int(args["n_embd"]),
        block_size=int(args["block_size"]), dropout=float(args.get("dropout", 0.0)),
        # bias and tokeniser are not saved upstream: read them off the weights
        bias=any(k.endswith(".bias") for k in state),
        tokeniser="aim" if any(re.match(r"^encoders\.[^.]+\.proj\.", k) for k in state) else "affine",
        modalities=upstream_modalities(raw, src),
    )
    model = build_astropt(model_cfg)
    ckpt.load_state_strict(model, state, str(src))
    layout = "2.x" if any(ckpt.clean_key(k).startswith("transformer.wte.") for k in raw["model"]) else "3.x"
    best = float(raw["best_val_loss"]) if raw.get("best_val_loss") is not None else None
    return ckpt.write_converted(out, FAMILY, model, AstroPTConfig(model=model_cfg), int(raw.get("iter_num", 0) or 0),
                                converted_from=str(src), upstream_layout=layout, best_val_loss=best)
