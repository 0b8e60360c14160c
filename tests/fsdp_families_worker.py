"""One rank of the FSDP test of every family: each family's demo, shrunk, trained 2 steps with
train.parallel=fsdp and an uneven validation split (3 batches over 2 ranks); runs labelled
`family-variant` are that family with other settings (e.g. a classifier under DDP). Usage:
python -m tests.fsdp_families_worker OUT PORT_OF_RUN1,PORT_OF_RUN2,... (RANK / WORLD_SIZE set)."""

import os
import sys
from pathlib import Path

import torch

from fmb.models import get_family
from fmb.recipes import RunRequest, load_run_config

COMMON = ["train.parallel=fsdp", "train.max_steps=2", "train.batch_size=2", "train.eval_every=1",
          "train.eval_max_batches=3", "train.eval_at_start=false", "train.num_workers=0", "train.log_every=1",
          "train.progress=false", "train.checkpoint.every=2", "train.device=cpu"]
TINY = {
    "astropt": ["data.synthetic=24", "data.image_size=16", "data.val_fraction=0.3", "model.n_layer=1",
                "model.n_embd=32", "model.n_head=2"],
    "aion": ["data.synthetic=24", "data.val_fraction=0.3", "model.codec.standin_steps=0",
             "model.codec.shape.hidden_dims=8", "data.sample_grid=0"],
    "astroclip": ["data.synthetic=40", "data.synthetic_image_size=16", "data.image_size=16"],
    "specformer": ["data.synthetic=40", "data.synthetic_image_size=16"],
    "astrom3": ["data.synthetic=60"],
    # DDP wraps the model (FSDP does not): the classifier must not read attributes through the wrapper.
    "astrom3-photo-ddp": ["data.synthetic=60", "model.mode=photo", "train.parallel=ddp",
                          "train.checkpoint.best_metric=val/accuracy"],
    "astromodal": ["data.synthetic=120", "data.val_fraction=0.3", "tokenizer.scalar_bins=16",
                   "tokenizer.spectrum_codebook=8", "tokenizer.desi_rebin=128", "tokenizer.image_codebook=16",
                   "tokenizer.image_downsample=4", "tokenizer.image_hidden=4", "tokenizer.image_epochs=1",
                   "tokenizer.kmeans_steps=10", "tokenizer.kmeans_batch=512", "tokenizer.device=cpu"],
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, ports = Path(sys.argv[1]), sys.argv[2].split(",")
    for name, port in zip(TINY, ports, strict=True):
        os.environ["MASTER_PORT"] = port  # a fresh rendezvous per family
        family = get_family(name.split("-")[0])
        request = RunRequest(model=family.name, config_files=[], sets=[f"train.out={out / name}", *COMMON, *TINY[name]],
                             flags={}, demo=True)
        config, _ = load_run_config(request, family.trainer_class().config_cls)
        result = family.trainer_class()(config).fit()
        print(f"FAMILY {name} {result.status} step {result.step} {sorted(result.metrics)}", flush=True)
