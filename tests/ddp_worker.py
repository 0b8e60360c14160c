"""One rank of the multi-process tests: launched with RANK/WORLD_SIZE (or SLURM_*) and MASTER_* set.
Exits 75 when the run was stopped by a signal, as `fmb retrain` does. With --validate-only it
resumes the run's checkpoint and prints one validation's figures as JSON."""

import argparse
import json

import torch

from fmb.train.distributed import exit_process
from tests.toy import ToyTrainer, toy_config

if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("batch", type=int)
    parser.add_argument("accum", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--parallel", default="ddp")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--decay-steps", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--validate-only", action="store_true")
    args = parser.parse_args()
    cfg = toy_config(args.out, batch_size=args.batch, grad_accum_steps=args.accum, max_steps=args.steps,
                     eval_every=3, parallel=args.parallel, num_workers=args.num_workers)
    cfg.train.schedule.decay_steps = args.decay_steps
    cfg.data.n_val = args.n_val
    trainer = ToyTrainer(cfg)
    if args.validate_only:
        trainer.setup(resume=True)
        try:
            metrics = trainer.validate()
        finally:
            trainer.close()
        print("VALIDATION " + json.dumps(metrics))
        exit_process(0)
    result = trainer.fit(resume=args.resume)
    print(f"rank {trainer.dist.rank} done: {result.status} step {result.step} val {result.metrics}")
    exit_process(result.exit_code)
