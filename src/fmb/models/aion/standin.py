"""A stand-in for the published AION image codec where its (gated) weights are not on disk.

A codec with random weights is a random feature extractor whose round trip is far from the
identity, so adapters trained through it learn whatever code survives it rather than an
HSC-like image, and its latents say little about the galaxy. The stand-in is that random codec
trained briefly as an auto-encoder (MSE in the codec's range-compressed space, through the
quantiser) on synthetic HSC cutouts (fmb.data.synth.hsc): like the real codec, it has seen HSC
galaxies. It is written in the published layout (config.json + model.safetensors), so any run
can load it with model.codec.path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fmb.data.synth.hsc import hsc_cutouts
from fmb.errors import ConfigError
from fmb.models.aion.model import CROP, HSC_BANDS, AionImageCodec, CodecConfig, SqueezeExcite
from fmb.models.aion.weights import CONFIG_NAME, STANDIN_MARK, WEIGHTS_NAME, save_codec

log = logging.getLogger("fmb")

BATCH_SIZE = 16
LR = 3e-3  # AdamW, decayed linearly to zero
HELD_OUT = 32  # fixed synthetic cutouts the before/after error is measured on


def relative_round_trip_error(codec: AionImageCodec, cutouts: torch.Tensor) -> float:
    """Round-trip MSE of HSC `cutouts` in the codec's range-compressed space over the variance of the
    input there: 1 is no better than predicting the mean value everywhere, 0 is perfect."""
    with torch.no_grad():
        target, decoded = codec.compressed_round_trip(cutouts, HSC_BANDS)
    return (F.mse_loss(decoded, target) / target.var()).item()


def start_from_the_data(codec: AionImageCodec, cutouts: torch.Tensor) -> None:
    """Initialisation for training from scratch. Range-compressed HSC cutouts are small (std ~0.04):
    at the default initialisation the random biases are 10-100 x the image signal, which the encoder's
    LayerNorm then normalises away, and training sat on the predict-the-mean plateau for hundreds of
    steps. Zero biases (the squeeze-excite gates keep theirs: they start closed) and an input
    projection scaled to unit signal let it learn from the first steps."""
    gates = {id(module.net[2].bias) for module in codec.modules() if isinstance(module, SqueezeExcite)}
    with torch.no_grad():
        for name, parameter in codec.named_parameters():
            if name.endswith(".bias") and id(parameter) not in gates:
                parameter.zero_()
        padded, present = codec.preprocess(cutouts, HSC_BANDS)
        codec.subsample_in.weight /= padded[:, present[0]].std().clamp_min(1e-6)


def pretrain(cfg: CodecConfig, steps: int, seed: int, device: torch.device, bf16: bool = False,
             progress: bool = True) -> tuple[AionImageCodec, dict[str, float]]:
    """A codec of shape `cfg` from random weights, trained `steps` steps on fresh synthetic HSC cutouts,
    and its held-out relative round-trip error before and after. bf16 autocast only: the gradients
    reaching the decoder are ~1e-8, below fp16's range, and the codec is small enough for fp32."""
    if steps < 1:
        raise ValueError(f"the stand-in codec needs at least one training step, got {steps}")
    rng = np.random.default_rng(seed)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        codec = AionImageCodec(cfg).to(device).train()
    held_out = torch.from_numpy(hsc_cutouts(HELD_OUT, rng, CROP)).to(device)
    start_from_the_data(codec, held_out)
    before = relative_round_trip_error(codec, held_out)
    optimizer = torch.optim.AdamW(codec.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    for _ in tqdm(range(steps), desc="stand-in codec", unit="step", disable=not progress):
        batch = torch.from_numpy(hsc_cutouts(BATCH_SIZE, rng, CROP)).to(device, non_blocking=True)
        with amp():
            target, decoded = codec.compressed_round_trip(batch, HSC_BANDS)
        loss = F.mse_loss(decoded, target)  # both fp32: preprocessing and decoding leave autocast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    codec.eval()
    errors = {"error_before": before, "error_after": relative_round_trip_error(codec, held_out)}
    log.info(f"stand-in codec: {steps} steps on synthetic HSC cutouts; held-out round-trip error "
             f"{before:.3f} -> {errors['error_after']:.3f} of the input variance (1 = the mean value everywhere)")
    if errors["error_after"] > 0.9:
        log.warning("the stand-in codec learned little (held-out error still near 1): raise model.codec.standin_steps")
    return codec, errors


def ensure_standin(directory: Path, cfg: CodecConfig, steps: int, seed: int, device: torch.device, bf16: bool = False,
                   progress: bool = True) -> Path:
    """The stand-in codec under `directory`: pretrained and written there, or reused when a complete one
    trained with the same steps, seed and shape is there already (a resumed run)."""

    def write(staging: Path) -> dict:
        log.warning(f"no published AION codec: pretraining a stand-in ({steps} steps on synthetic HSC cutouts) into "
                    f"{directory}. Fine for demos and evaluation on synthetic data; use the real weights for science.")
        codec, errors = pretrain(cfg, steps, seed, device, bf16, progress)
        save_codec(codec.cpu(), staging)
        return {**errors, "source": "synthetic HSC cutouts (fmb.data.synth.hsc)"}

    return write_once(directory, {"steps": steps, "seed": seed, "shape": dataclasses.asdict(cfg)}, "stand-in codec", write)


def write_once(directory: Path, wanted: dict, what: str, write: Callable[[Path], dict]) -> Path:
    """`directory` if it holds a complete stand-in (config.json, model.safetensors, standin.json) made with
    `wanted` (a resumed run; one made otherwise is an error); else `write(staging)` fills a sibling directory,
    whose standin.json records `wanted` and what `write` returns, and it is renamed, so a crash never leaves
    a half-written stand-in behind."""
    if all((directory / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME, STANDIN_MARK)):
        found = json.loads((directory / STANDIN_MARK).read_text())
        if {key: found.get(key) for key in wanted} != wanted:
            raise ConfigError(f"{directory} holds a {what} made with {found}, not {wanted}: delete it "
                              "or choose another --out")
        log.info(f"{what}: reusing {directory}")
        return directory
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    record = write(staging)
    (staging / STANDIN_MARK).write_text(json.dumps({**wanted, **record}, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory
