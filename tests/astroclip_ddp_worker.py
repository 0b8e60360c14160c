"""One rank of the AstroCLIP DDP validation test: validates at step 0 and after one step."""

import sys

import torch

from fmb.models.astroclip.trainer import AstroCLIPConfig, AstroCLIPTrainer
from fmb.train.distributed import exit_process
from tests.test_astroclip import tiny_config


def run_config(out, h5) -> AstroCLIPConfig:
    cfg = tiny_config(out, h5)
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_at_start = 5, 1, True
    return cfg


if __name__ == "__main__":
    torch.set_num_threads(1)
    exit_process(AstroCLIPTrainer(run_config(sys.argv[1], sys.argv[2])).fit().exit_code)
