"""Gather what `benchmarks/gpu_check.sh` left in its output directory into summary.json and summary.md.

    python benchmarks/gpu_summary.py OUT [--mode gpu|cpu]

Reads OUT/steps.tsv (name, exit code, seconds, command per step), each demo's status.json and last
logged losses, the `fmb bench` JSON files and the loader benchmark's JSON. Exit code 0 when every step
passed, 1 otherwise (the summary is written either way).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

BENCH_KEYS = ("device", "precision", "compile", "parameters", "batch_size", "step_time_s", "samples_per_s",
              "tokens_per_s", "flops_per_sample", "achieved_tflops", "mfu", "peak_memory_gb", "loader_samples_per_s")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_record(run: Path) -> dict[str, Any]:
    """How a training run ended, and its first and last logged training and validation losses."""
    status = read_json(run / "status.json") or {}
    losses: dict[str, list[float]] = {}
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        for key in ("train/loss", "val/loss"):
            if key in record:
                losses.setdefault(key, []).append(record[key])
    return {"status": status.get("status"), "step": status.get("step"),
            **{f"{key} first": values[0] for key, values in losses.items()},
            **{f"{key} last": values[-1] for key, values in losses.items()}}


def summarize(out: Path, mode: str) -> dict[str, Any]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, code, seconds, command = line.split("\t", 3)
        steps.append({"name": name, "exit_code": int(code), "seconds": round(float(seconds), 1), "command": command})
    for step in steps:
        if step["name"].startswith(("demo-", "torchrun-")):
            step["run"] = run_record(out / step["name"])
    bench = {name: {k: v for k, v in (read_json(out / f"{name}.json") or {}).items() if k in BENCH_KEYS}
             for name in ("bench-astropt", "compile-astropt")}
    loader = read_json(out / "loader.json") or {}
    import torch

    environment = {"mode": mode, "python": platform.python_version(), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"environment": environment, "all_passed": all(s["exit_code"] == 0 for s in steps),
            "total_seconds": round(sum(s["seconds"] for s in steps), 1), "steps": steps,
            "bench": {k: v for k, v in bench.items() if v},
            "loader": {k: loader.get(k) for k in ("samples_per_s", "samples_per_cpu_s", "image_size", "batch")},
            "not_run": ["compile-astropt (CPU mode: inductor compilation alone takes minutes on CPU)"] if mode != "gpu" else []}


def markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    lines = [f"# GPU check ({env['mode']} mode): {'all steps passed' if summary['all_passed'] else 'FAILED STEPS'}", "",
             f"{env['gpu'] or 'no GPU'}, torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}; "
             f"{summary['total_seconds']} s in all", "",
             "| step | exit | seconds | result |", "|---|---|---|---|"]
    for step in summary["steps"]:
        run = step.get("run", {})
        result = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items() if v is not None)
        lines.append(f"| {step['name']} | {step['exit_code']} | {step['seconds']} | {result} |")
    for name, figures in summary["bench"].items():
        lines += ["", f"## {name}", ""] + [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                                          for k, v in figures.items()]
    if summary["loader"].get("samples_per_s"):
        lines += ["", f"## loader ({summary['loader']['image_size']} px, batch {summary['loader']['batch']})", ""]
        per_cpu = summary["loader"]["samples_per_cpu_s"]
        lines += [f"- {name}: {rate:.1f} samples/s, {per_cpu[name]:.1f} per CPU second"
                  for name, rate in summary["loader"]["samples_per_s"].items()]
    if summary["not_run"]:
        lines += ["", "Not run: " + "; ".join(summary["not_run"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", default="gpu", choices=["gpu", "cpu"])
    args = parser.parse_args()
    summary = summarize(args.out, args.mode)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    sys.exit(0 if summary["all_passed"] else 1)


if __name__ == "__main__":
    main()
