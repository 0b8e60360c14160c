"""Activation checkpointing (`train.activation_checkpointing`): memory and time of one training step,
with and without, for AstroPT, AstroCLIP (ViT + SpecFormer) and astromodal.

    PYTHONPATH=src python benchmarks/checkpointing_bench.py                 # CPU, mid-size models
    PYTHONPATH=src python benchmarks/checkpointing_bench.py --device cuda --large   # + 2100M / ViT-L / base

Each (model, setting) runs in its own process. Memory: on CPU the rise of the resident set during
one forward + backward (peak RSS minus RSS before it); on CUDA the peak allocated memory of the
step. Also the bytes autograd keeps for backward (counted through saved-tensor hooks: exact, not
timed). Time: CPU time (CPU) or wall time (CUDA) of a second step, after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from fmb.models.checkpointing import set_activation_checkpointing

# (label, family, size arguments, batch)
CPU_CASES = [
    ("astropt 010M, 975 tokens", "astropt", {"preset": "010M"}, 4),
    ("astroclip ViT-S/12 144 px + SpecFormer base", "astroclip", {"image": "small", "spectrum": "base"}, 4),
    ("astromodal small, 1024 tokens", "astromodal", {"preset": "small", "length": 1024}, 4),
]
LARGE_CASES = [
    ("astropt 2100M, 975 tokens", "astropt", {"preset": "2100M"}, 8),
    ("astroclip ViT-L/12 144 px + SpecFormer base", "astroclip", {"image": "large", "spectrum": "base"}, 64),
    ("astromodal base, 2048 tokens", "astromodal", {"preset": "base", "length": 2048}, 16),
]


def build(family: str, size: dict, batch: int, device: torch.device):
    """(model, loss function) on random inputs of the real shapes."""
    if family == "astropt":
        from fmb.models.astropt.model import PRESETS, AstroPT, GPTShape, Modality, next_patch_loss

        layers, heads, width, _ = PRESETS[size["preset"]]
        model = AstroPT(GPTShape(layers, heads, width, 1024),
                        [Modality("images", 768, 16, loss_weight=779 / 196), Modality("spectra", 10, 10)])
        tokens = {"images": torch.rand(batch, 196, 768, device=device), "spectra": torch.randn(batch, 779, 10, device=device)}
        positions = {k: torch.arange(v.shape[1], device=device).expand(batch, -1) for k, v in tokens.items()}
        return model, lambda m: next_patch_loss(model.modalities, tokens, m(tokens, positions))[0]
    if family == "astroclip":
        from fmb.models.astroclip.model import clip_loss
        from fmb.models.astroclip.trainer import AstroCLIPModelConfig, build_astroclip

        model = build_astroclip(AstroCLIPModelConfig(image_preset=size["image"], patch_size=12,
                                                     spectrum_preset=size["spectrum"], head_dropout=0.0), 144)
        images, spectra = torch.rand(batch, 3, 144, 144, device=device), 1.0 + torch.randn(batch, 7781, device=device)
        return model, lambda m: clip_loss(*m(images, spectra))
    from fmb.models.astromodal.data import Vocabulary
    from fmb.models.astromodal.model import AstromodalModelConfig, AstromodalTransformer

    vocab = Vocabulary(image_size=1024, image_tokens=576, scalar_columns=[f"c{i}" for i in range(40)], scalar_bins=256,
                       groups={"desi_b": 512, "desi_r": 512, "desi_z": 512, "gaiaxp_bp": 256, "gaiaxp_rp": 256})
    length = size["length"]
    model = AstromodalTransformer(AstromodalModelConfig(preset=size["preset"], max_len=length), vocab, image_dim=2)
    tokens = torch.randint(5, vocab.size, (batch, length), device=device)
    types = torch.randint(0, vocab.n_types, (batch, length), device=device)
    return model, lambda m: torch.nn.functional.cross_entropy(m(tokens[:, :-1], types[:, :-1]).flatten(0, 1).float(),
                                                              tokens[:, 1:].flatten())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model, loss_fn = build(spec["family"], spec["size"], spec["batch"], device)
    model.to(device).train()
    set_activation_checkpointing(model, spec["checkpointing"], spec["family"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    before = rss_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = loss_fn(model)
    loss.backward()
    out = {"kept_gb": sum(storages.values()) / 2**30}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["step_memory_gb"] = (torch.cuda.max_memory_allocated() - start_alloc) / 2**30
    else:
        out["step_memory_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**30
    model.zero_grad(set_to_none=True)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    with autocast:
        loss = loss_fn(model)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["step_s"] = clock() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true", help="add the large presets (a GPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    load = os.getloadavg()[0]
    print(f"device {args.device} | {args.threads} threads | load average {load:.1f} | "
          f"memory: {'peak allocated' if args.device.startswith('cuda') else 'RSS rise'} during one step")
    print(f"{'model':<46}{'batch':>6}{'kept off GB':>13}{'kept on GB':>12}{'step mem off':>14}{'step mem on':>13}"
          f"{'time on/off':>13}")
    for label, family, size, batch in CPU_CASES + (LARGE_CASES if args.large else []):
        results = []
        for checkpointing in (False, True):
            spec = {"device": args.device, "family": family, "size": size, "batch": batch, "checkpointing": checkpointing}
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec), "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            if done.returncode:
                results.append(None)
                print(f"{label}: {'on' if checkpointing else 'off'} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if None in results:
            continue
        off, on = results
        print(f"{label:<46}{batch:>6}{off['kept_gb']:>13.2f}{on['kept_gb']:>12.2f}{off['step_memory_gb']:>14.2f}"
              f"{on['step_memory_gb']:>13.2f}{on['step_s'] / off['step_s']:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
