"""`fmb benchmark` on small pre-written embedding files: suite checks, frozen folds, leaderboard, report."""

from __future__ import annotations

import base64
import csv
import re

import numpy as np
import pytest

from fmb.errors import ConfigError, DataError
from tests.cli_runner import run_cli
from tests.extras import need
from tests.test_evaluation import planted, write_file

need("sklearn")
from fmb.evaluation.benchmark import run_benchmark  # noqa: E402


def write_models(tmp_path):
    """good: the planted signal; noisy: signal plus noise and a poor prediction of its own (zero-shot
    `noisy_redshift`); both with a random-init baseline."""
    x, z, labels = planted(n=240)
    rng = np.random.default_rng(7)
    ids = np.arange(500, 740)
    targets = {"redshift": z, "klass": labels}
    noise = rng.standard_normal(x.shape).astype(np.float32)
    write_file(tmp_path / "good.parquet", ids, {"image": x, "joint": x}, **targets)
    own = z + 0.4 * (1 + z) * rng.standard_normal(len(z))
    write_file(tmp_path / "noisy.parquet", ids[::-1], {"image": x + 2.0 * noise}, noisy_redshift=own[::-1],
               **{k: v[::-1] for k, v in targets.items()})
    write_file(tmp_path / "good_random.parquet", ids, {"image": noise, "joint": noise}, **targets)
    write_file(tmp_path / "noisy_random.parquet", ids, {"image": noise * 0.5}, **targets)


SUITE = """name: tiny
seed: 1
folds: 4
k: 8
bootstrap: 200
plots: {plots}
projections: [pca]
models:
  - {{name: good, embeddings: good.parquet, baseline: good_random.parquet}}
  - {{name: noisy, embeddings: noisy.parquet, baseline: noisy_random.parquet{columns}}}
tasks:
  - {{target: redshift, probes: [knn, linear], fractions: [0.2, 1.0]}}
  - {{target: klass, probes: [linear], fractions: [1.0]}}
"""


def write_suite(tmp_path, plots="false", columns="", name="suite.yaml"):
    path = tmp_path / name
    path.write_text(SUITE.format(plots=plots, columns=columns))
    return path


def test_leaderboard_ranks_the_planted_signal_first_and_folds_are_frozen(tmp_path, caplog):
    write_models(tmp_path)
    suite = write_suite(tmp_path)
    result = run_benchmark(suite, tmp_path / "out")
    board = {(e["task"], e["model"], e["embedding"]): e for e in result.leaderboard}
    redshift = [e for e in result.leaderboard if e["task"] == "redshift"]
    assert [e["model"] for e in redshift][:2] == ["good", "good"] and redshift[-1]["model"] == "noisy"
    assert redshift[0]["metric"] == "nmad" and redshift[0]["value"] < redshift[-1]["value"]
    assert not board[("redshift", "noisy", "image")]["tied"]  # clearly worse: intervals apart
    zero_shot = board[("redshift", "noisy", "noisy_redshift")]  # the model's own prediction, ranked with the probes
    assert zero_shot["probe"] == "zero-shot" and zero_shot["labels"] == 0.0 and zero_shot == redshift[-1]
    klass = board[("klass", "good", "joint")]
    assert klass["metric"] == "accuracy" and klass["value"] > klass["baseline"] and klass["low"] < klass["value"] < klass["high"]
    with open(tmp_path / "out" / "split.csv") as handle:
        split = list(csv.DictReader(handle))
    assert len(split) == 240 and {int(r["fold"]) for r in split} == {0, 1, 2, 3}
    first = (tmp_path / "out" / "results.csv").read_text()
    assert "nmad" in first and "sigma_68" in first and "macro_f1" in first
    # another run (here: one model less) reads the frozen folds back: the same figures for the same rows
    with caplog.at_level("INFO", logger="fmb"):
        again = run_benchmark(write_suite(tmp_path, columns=", columns: [image]", name="again.yaml"), tmp_path / "out")
    assert "frozen folds of 240 objects reused" in caplog.text
    shared = {(r["model"], r["embedding"], r["target"], r["probe"], r["labels"], r["metric"]): r["value"] for r in result.rows}
    assert all(shared[key] == pytest.approx(r["value"]) for r in again.rows
               for key in [(r["model"], r["embedding"], r["target"], r["probe"], r["labels"], r["metric"])])
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "fmb benchmark" in md and "| 1 | good |" in md and "### Ranks per task" in md and "| zero-shot |" in md
    similarity = (tmp_path / "out" / "similarity.md").read_text()
    assert "good/image" in similarity and "noisy/image" in similarity


def test_report_html_is_self_contained_with_every_section(tmp_path, monkeypatch, capsys):
    need("matplotlib")
    write_models(tmp_path)
    suite = write_suite(tmp_path, plots="true")
    code, out, err = run_cli(monkeypatch, capsys, "benchmark", str(suite), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "report.html" in out
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for heading in ("Leaderboard", "Ranks per task", "Similarity between embeddings", "Projections", "Models"):
        assert f"<h2>{heading}</h2>" in html
    assert "id='task-redshift'" in html and "id='task-klass'" in html
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    figures = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    # per task few-shot (redshift only: klass has one fraction) and scatter / confusion; PCA per model; similarity
    assert figures == ["good__joint__pca.png", "klass__confusion.png", "noisy__image__pca.png", "redshift__few_shot.png",
                       "redshift__scatter.png", "similarity.png"]
    assert len(images) == len(figures)
    # each figure as wide as its PNG, so captions wrap under it and figures sit side by side
    widths = [int(w) for w in re.findall(r'<figure style="width:(\d+)px">', html)]
    assert widths == [int.from_bytes(base64.b64decode(i)[16:20], "big") for i in images]
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from elsewhere
    assert html.count("<table>") >= 5 and "fmb benchmark " in html


def test_bad_suites_are_clear_errors(tmp_path, monkeypatch, capsys):
    write_models(tmp_path)
    with pytest.raises(DataError, match=r"suite model 'noisy': .*noisy\.parquet has no column embedding_spectrum"):
        run_benchmark(write_suite(tmp_path, columns=", columns: [spectrum]"), tmp_path / "out")
    suite = write_suite(tmp_path)
    suite.write_text(suite.read_text().replace("target: klass", "target: mass"))
    with pytest.raises(DataError, match="suite task 'mass'.*no such column"):
        run_benchmark(suite, tmp_path / "out")
    suite.write_text(suite.read_text().replace("target: mass", "target: klass").replace("k: 8", "k: 8\ndraws: 0"))
    with pytest.raises(ConfigError, match="draws: 0; at least one label draw"):
        run_benchmark(suite, tmp_path / "out")
    suite.write_text(suite.read_text().replace("bootstrap:", "bootstraps:"))
    with pytest.raises(ConfigError, match="unknown config key 'bootstraps'.*did you mean 'bootstrap'"):
        run_benchmark(suite, tmp_path / "out")
    (tmp_path / "empty.yaml").write_text("name: empty\n")
    code, _, err = run_cli(monkeypatch, capsys, "benchmark", str(tmp_path / "empty.yaml"))
    assert code == 2 and "at least one entry under models:" in err
    code, _, err = run_cli(monkeypatch, capsys, "benchmark")
    assert code == 2 and "--demo" in err
