"""One rank of the multi-process tests: launched with RANK/WORLD_SIZE (or SLURM_*) and MASTER_* set."""

import argparse

import torch

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
    args = parser.parse_args()
    cfg = toy_config(args.out, batch_size=args.batch, grad_accum_steps=args.accum, max_steps=args.steps,
                     eval_every=3, parallel=args.parallel)
    cfg.train.schedule.decay_steps = args.decay_steps
    trainer = ToyTrainer(cfg)
    result = trainer.fit(resume=args.resume)
    print(f"rank {trainer.dist.rank} done: {result.status} step {result.step} val {result.metrics}")
