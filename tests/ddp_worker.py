"""One rank of the DDP test: launched twice with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set."""

import sys

import torch

from tests.toy import ToyTrainer, toy_config

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, batch, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = toy_config(out, batch_size=batch, grad_accum_steps=accum, max_steps=steps, eval_every=3)
    trainer = ToyTrainer(cfg)
    result = trainer.fit(resume="--resume" in sys.argv)
    rank = trainer.dist.rank
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, f"{out}/final_rank{rank}.pt")
    print(f"rank {rank} done: {result.status} step {result.step} val {result.metrics}")
