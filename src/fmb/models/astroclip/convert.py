"""`fmb convert astroclip SRC --out DIR`: published AstroCLIP, AstroDINO or SpecFormer weights -> fmb.

What SRC holds decides what is written:
- the AstroCLIP Lightning checkpoint (`state_dict` with `image_encoder.*` / `spectrum_encoder.*`):
  a whole `astroclip` checkpoint directory, with `model.image_positions: false` (the published
  image head saw patch embeddings without CLS token or positions);
- an AstroDINO checkpoint (DINOv2 teacher: `{"teacher": {"backbone.*", "dino_head.*"}}`, or a
  bare ViT state dict): an image-backbone directory for `model.image_init_from`;
- a SpecFormer Lightning checkpoint (`state_dict` with `data_embed.*`): a `specformer`
  checkpoint directory for `model.spectrum_init_from` or `fmb retrain specformer`.

Key layouts (upstream -> fmb): DINOv2 ViT keys are fmb's own (`blocks.N.norm1`, `attn.qkv`,
`ls1.gamma`, `mlp.fc1` ...), except chunked blocks `blocks.C.N.` -> `blocks.N.` and the iBOT
`mask_token`, which is dropped. SpecFormer: `layernorm1/2` -> `norm1/2`, `attention.attention`
-> `attn.qkv`, `attention.projection` -> `attn.proj`, `mlp.encoder/decoder` -> `mlp.fc1/fc2`.
Heads: `cross_attention.multihead_attn` (torch MultiheadAttention: `in_proj_weight` split in
three, or `q/k/v_proj_weight`; `in_proj_bias`; `out_proj`) -> `head.q/k/v/out_proj`,
`cross_attention.layernorm` -> `head.norm`, `mlp.encoder/decoder` -> `head.mlp.fc1/fc2`;
`logit_scale` (learnable variant) -> `log_scale`. The loading is strict: a missing,
unexpected or mis-shaped key stops the conversion with the full list.

Upstream checkpoints pickle Lightning / astroclip / dinov2 objects next to the weights. They
are read by fmb's one reader of upstream checkpoints (`checkpoint.read_foreign`), which rebuilds
tensors and plain containers and turns every other class or function into an inert placeholder:
nothing in the file runs, and none of those packages is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmb.errors import CheckpointError
from fmb.models.astroclip.model import SPECFORMER_PRESETS, VIT_PRESETS, ViT, ViTShape
from fmb.models.astroclip.trainer import (
    FAMILY,
    IMAGE_BACKBONE,
    SPECFORMER_FAMILY,
    AstroCLIPConfig,
    AstroCLIPModelConfig,
    SpecFormerConfig,
    SpecFormerModelConfig,
    build_astroclip,
    build_specformer,
)
from fmb.train import checkpoint as ckpt


def read_checkpoint(path: Path) -> dict[str, Any]:
    raw = ckpt.read_foreign(path, unknown="inert")  # Lightning hyper-parameters become inert placeholders
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a dictionary of weights")
    return raw


def tensors_of(raw: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The weights of a Lightning checkpoint, a DINOv2 teacher checkpoint or a bare state dict."""
    for key in ("state_dict", "teacher", "model"):
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    state = {ckpt.clean_key(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no weights (looked in state_dict, teacher, model and the top level)")
    return state


# ----------------------------------------------------------------------------- key mapping


def map_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 ViT keys (possibly chunked) -> fmb ViT keys; the iBOT mask token is dropped."""
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    return out


_SPECFORMER_RULES = [
    (r"\.layernorm1\.", ".norm1."),
    (r"\.layernorm2\.", ".norm2."),
    (r"\.attention\.attention\.", ".attn.qkv."),
    (r"\.attention\.projection\.", ".attn.proj."),
    (r"\.mlp\.encoder\.", ".mlp.fc1."),
    (r"\.mlp\.decoder\.", ".mlp.fc2."),
]


def map_specformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in _SPECFORMER_RULES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def map_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream `cross_attention.*` + `mlp.*` of one encoder -> fmb `head.*`."""
    out = {}
    for key, value in state.items():
        if key == "cross_attention.multihead_attn.in_proj_weight":
            for name, part in zip(("q", "k", "v"), value.chunk(3), strict=True):
                out[f"head.{name}_proj.weight"] = part
        elif key == "cross_attention.multihead_attn.in_proj_bias":
            for name, part in zip(("q", "k", "v"), value.chunk(3), strict=True):
                out[f"head.{name}_proj.bias"] = part
        elif match := re.fullmatch(r"cross_attention\.multihead_attn\.([qkv])_proj_weight", key):
            out[f"head.{match.group(1)}_proj.weight"] = value
        elif key.startswith("cross_attention.multihead_attn.out_proj."):
            out["head.out_proj." + key.rsplit(".", 1)[1]] = value
        elif key == "cross_attention.query":
            out["head.query"] = value
        elif key.startswith("cross_attention.layernorm."):
            out["head.norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("mlp.encoder."):
            out["head.mlp.fc1." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("mlp.decoder."):
            out["head.mlp.fc2." + key.rsplit(".", 1)[1]] = value
        else:
            out[key] = value  # left for the strict load to report
    return out


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _depth(state: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def _preset_for(table: dict[str, tuple[int, int, int]], width: int, depth: int, what: str, path: Path) -> str:
    for name, (w, d, _) in table.items():
        if (w, d) == (width, depth):
            return name
    raise CheckpointError(f"{path}: the {what} is {width} wide and {depth} deep, which matches no preset "
                          f"({', '.join(f'{n} {w}/{d}' for n, (w, d, _) in table.items())})")


def vit_config(state: dict[str, torch.Tensor], path: Path) -> tuple[str, int, int]:
    """(preset, patch size, image size) of fmb-layout ViT weights."""
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{path}: no pos_embed / patch_embed.proj.weight in the image backbone")
    if any(k.startswith("register_tokens") for k in state):
        raise CheckpointError(f"{path}: ViTs with register tokens are not supported")
    width, patch = state["pos_embed"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    preset = _preset_for(VIT_PRESETS, width, _depth(state, r"blocks\.(\d+)\."), "image backbone", path)
    return preset, patch, grid * patch


def specformer_config(state: dict[str, torch.Tensor], hparams: Any, path: Path) -> SpecFormerModelConfig:
    if "data_embed.weight" not in state or "position_embed.weight" not in state:
        raise CheckpointError(f"{path}: no data_embed / position_embed weights in the spectrum backbone")
    width, features = state["data_embed.weight"].shape
    preset = _preset_for(SPECFORMER_PRESETS, width, _depth(state, r"blocks\.(\d+)\."), "SpecFormer", path)
    hparams = hparams if isinstance(hparams, dict) else {}
    slice_length = int(hparams.get("slice_section_length", features - 2))
    stride = slice_length - int(hparams.get("slice_overlap", slice_length // 2))
    return SpecFormerModelConfig(preset=preset, max_len=state["position_embed.weight"].shape[0], slice=slice_length,
                                 stride=stride, dropout=0.0)


# ----------------------------------------------------------------------------- writing


def _write(model: nn.Module, out: Path, family: str, config: Any, meta: dict[str, Any]) -> Path:
    return ckpt.write_converted(out, family, model, config, **meta)


def convert(src: Path, out: Path) -> Path:
    src, out = Path(src), Path(out)
    if src.is_dir():
        raise CheckpointError(f"{src} is a directory; give the upstream .ckpt / .pth file")
    raw = read_checkpoint(src)
    state = tensors_of(raw, src)
    meta = {"converted_from": str(src)}
    if any(k.startswith("image_encoder.") for k in state) and any(k.startswith("spectrum_encoder.") for k in state):
        return _convert_astroclip(state, src, out, meta)
    if "data_embed.weight" in state:
        cfg = specformer_config(map_specformer(state), raw.get("hyper_parameters"), src)
        model = build_specformer(cfg)
        ckpt.load_state_strict(model, map_specformer(state), str(src))
        return _write(model, out, SPECFORMER_FAMILY, SpecFormerConfig(model=cfg), {**meta, "upstream": "specformer"})
    vit_state = map_vit({k.removeprefix("backbone."): v for k, v in state.items()
                         if not k.startswith(("dino_head.", "ibot_head."))})
    if "pos_embed" in vit_state:
        preset, patch, size = vit_config(vit_state, src)
        width, depth, heads = VIT_PRESETS[preset]
        model = ViT(ViTShape(width=width, depth=depth, heads=heads, patch_size=patch, image_size=size))
        ckpt.load_state_strict(model, vit_state, str(src))
        config = AstroCLIPConfig(model=AstroCLIPModelConfig(image_preset=preset, patch_size=patch))
        config.data.image_size = size
        return _write(model, out, FAMILY, config, {**meta, "upstream": "astrodino", "component": IMAGE_BACKBONE})
    shown = ", ".join(sorted(state)[:8])
    raise CheckpointError(f"{src} is none of AstroCLIP (image_encoder.*, spectrum_encoder.*), SpecFormer "
                          f"(data_embed.*) or AstroDINO (pos_embed, blocks.*); its first keys: {shown}")


def _convert_astroclip(state: dict[str, torch.Tensor], src: Path, out: Path, meta: dict[str, Any]) -> Path:
    image = map_vit(_strip(state, "image_encoder.backbone."))
    spectrum = map_specformer(_strip(state, "spectrum_encoder.backbone."))
    preset, patch, size = vit_config(image, src)
    spec_cfg = specformer_config(spectrum, None, src)
    if "image_encoder.cross_attention.query" not in state:
        raise CheckpointError(f"{src}: no image_encoder.cross_attention.query")
    model_cfg = AstroCLIPModelConfig(
        image_preset=preset, patch_size=patch, image_positions=False, spectrum_preset=spec_cfg.preset,
        spectrum_max_len=spec_cfg.max_len, spectrum_slice=spec_cfg.slice, spectrum_stride=spec_cfg.stride,
        embed_dim=state["image_encoder.cross_attention.query"].shape[-1], learnable_scale="logit_scale" in state,
        finetune="heads",
    )
    mapped = {f"image_encoder.backbone.{k}": v for k, v in image.items()}
    mapped.update({f"spectrum_encoder.backbone.{k}": v for k, v in spectrum.items()})
    for encoder in ("image_encoder", "spectrum_encoder"):
        heads = {k: v for k, v in _strip(state, f"{encoder}.").items() if not k.startswith("backbone.")}
        mapped.update({f"{encoder}.{k}": v for k, v in map_head(heads).items()})
    leftovers = {k: v for k, v in state.items() if not k.startswith(("image_encoder.", "spectrum_encoder."))}
    if "logit_scale" in leftovers:
        mapped["log_scale"] = leftovers.pop("logit_scale").reshape(())
    mapped.update(leftovers)  # anything else is reported by the strict load
    config = AstroCLIPConfig(model=model_cfg)
    config.data.image_size = size
    model = build_astroclip(model_cfg, size)
    ckpt.load_state_strict(model, mapped, str(src))
    return _write(model, out, FAMILY, config, {**meta, "upstream": "astroclip"})
