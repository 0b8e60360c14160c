"""`fmb bench`: FLOP counting, MFU and throughput figures from real timed steps."""

from __future__ import annotations

import json
import sys

import pytest

from fmb import cli
from fmb.models import register_family
from fmb.train.bench import device_peak, run_bench
from fmb.train.flops import causal_fraction, flop_counter
from tests import toy


def test_bench_counts_flops_of_forward_and_backward(tmp_path):
    cfg = toy.toy_config(tmp_path / "b", batch_size=8)
    result = run_bench(toy.ToyTrainer(cfg), steps=3, warmup=1, loader_batches=4)
    # Linear(8, 16) and Linear(16, 1): 2 * (8*16 + 16*1) = 288 FLOPs per sample forward; backward
    # adds the weight gradients (288) and the input gradient of the second layer only (2*16*1 = 32).
    assert result["flops_per_sample"] == 288 + 288 + 32
    assert result["samples_per_s"] > 0 and result["step_time_s"] > 0 and result["loader_samples_per_s"] > 0
    assert 0 < result["mfu"] < 1.0 and result["peak_source"] == "measured fp32 matmul"
    assert result["tokens_per_s"] is None  # the toy family reports no tokens


@pytest.mark.parametrize("causal", [False, True])
def test_attention_flops_are_counted_on_cpu_and_causal_counts_the_kept_pairs(causal):
    import torch
    import torch.nn.functional as F

    batch, heads, length, dim = 2, 3, 16, 8
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    products = batch * heads * length * length * dim  # one (query, key) product over the head dimension
    kept = (length + 1) / (2 * length) if causal else 1.0
    # forward: scores and the weighted sum (2 x 2 FLOPs per product); backward: 5 products of the same size
    assert counter.get_total_flops() == round(4 * products * kept) + round(10 * products * kept)
    assert causal_fraction(4, 4) == 10 / 16 and causal_fraction(4, 2) == 7 / 8


def test_cpu_peak_is_measured():
    import torch

    peak, source = device_peak(torch.device("cpu"), "fp32")
    assert peak > 1e8 and "measured" in source


def test_cli_bench_writes_json(tmp_path, monkeypatch, capsys):
    register_family(toy.FAMILY)
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["fmb", "bench", "astropt", "--steps", "2", "--no-demo", "--json", str(out),
                                      "--paths", str(tmp_path / "none.yaml")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2  # no data configured and --no-demo
    monkeypatch.setattr(sys, "argv", ["fmb", "bench", "astropt", "--steps", "2", "--json", str(out),
                                      "--set", "data.synthetic=32", "--set", "data.image_size=32",
                                      "--set", "model.n_layer=1", "--set", "train.num_workers=0"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0, capsys.readouterr().err
    figures = json.loads(out.read_text())
    assert figures["family"] == "astropt" and figures["tokens_per_s"] > 0 and figures["parameters"] > 0
