"""Object views: lines at their observed wavelengths, cosine neighbours in a known order, the figures
of `fmb show`, `fmb gallery` and `fmb similar` written from synthetic Euclid+DESI data."""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmb.data.synth import euclid_desi
from fmb.embeddings import load_embeddings
from fmb.errors import DataError
from fmb.evaluation import views
from tests.cli_runner import run_cli
from tests.extras import need
from tests.test_evaluation import write_file


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """14 objects (12 train, 2 test), a third without image and a third without spectrum."""
    root = tmp_path_factory.mktemp("views")
    euclid_desi.write(root, n=14, seed=3, image_size=24, missing={"image": 0.35, "spectrum": 0.35})
    table = pa.concat_tables([pq.read_table(f, columns=["object_id", "redshift", "RGB_image", "spectrum"])
                              for f in sorted((root / "data").glob("*.parquet"))])
    return root, table


def test_lines_fall_at_their_observed_wavelengths():
    at_rest = {name: where for name, where, _ in views.observed_lines(0.0, 3600, 9824)}
    assert at_rest["Hα"] == pytest.approx(6564.61) and at_rest["Hβ"] == pytest.approx(4862.68)
    assert "Lyα" not in at_rest  # 1216 A is blue of the DESI range
    shifted = views.observed_lines(1.0, 3600, 9824)
    names = [name for name, _, _ in shifted]
    assert "Hα" not in names and "MgII" in names  # 13129 A is out of range, 2799 x 2 is in
    oii = next(where for name, where, _ in shifted if name == "[OII]")
    assert oii == pytest.approx(2 * 3728.48)
    lya = views.observed_lines(3.0, 3600, 9824)
    assert [(n, k) for n, _, k in lya][:2] == [("Lyα", "emission"), ("CIV", "emission")]
    assert lya[0][1] == pytest.approx(4 * 1215.67)
    assert views.observed_lines(float("nan"), 3600, 9824) == [] and views.observed_lines(None, 0, 1e5) == []


def test_nearest_neighbours_by_cosine_in_a_known_order():
    angles = np.array([0.0, 0.5, 0.1, 3.0, 0.3, 0.2, 1.0])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32) * np.arange(1, 8)[:, None]  # norms do not matter
    x[5] = np.nan  # absent for that object: never a neighbour
    rows, cosines = views.nearest(x, 0, k=4)
    assert rows.tolist() == [2, 4, 1, 6]
    np.testing.assert_allclose(cosines, np.cos(angles[[2, 4, 1, 6]]), rtol=1e-6)
    assert views.nearest(x, 0, k=50)[0].tolist() == [2, 4, 1, 6, 3]  # k beyond the sample: all others


def test_similar_objects_answers_and_errors(tmp_path):
    ids = np.arange(100, 106)
    x = np.eye(6, 3, dtype=np.float32) + 0.1
    x[4] = [1.0, 0.05, 0.0]  # closest to object 100
    image = x.copy()
    image[1] = np.nan
    path = write_file(tmp_path / "e.parquet", ids, {"joint": x, "image": image}, redshift=np.linspace(0, 1, 6))
    file = load_embeddings(path)
    column, found, cosines = views.similar_objects(file, 100, None, 2)
    assert column == "joint" and found[:2] == [100, 104] and cosines[0] == 1.0 and cosines[1] > cosines[2]
    with pytest.raises(DataError, match=r"e\.parquet: no object with object_id 999"):
        views.similar_objects(file, 999, None, 2)
    with pytest.raises(DataError, match=r"object 101 has no embedding_image"):
        views.similar_objects(file, 101, "image", 2)
    with pytest.raises(DataError, match=r"no column embedding_spectrum; it has embedding_joint, embedding_image"):
        views.similar_objects(file, 100, "spectrum", 2)
    with pytest.raises(DataError, match="'abc' is not an integer"):
        views.parse_id("abc", file.ids)


def test_objects_are_read_by_id_with_their_missing_modalities(sample):
    root, table = sample
    ids = table.column("object_id").to_pylist()
    items = views.read_objects(root, [ids[-1], ids[0]])  # a test-split object first: every split is searched
    assert [i.object_id for i in items] == [ids[-1], ids[0]]
    for item, position in zip(items, (len(ids) - 1, 0), strict=True):
        assert (item.rgb is None) == (table.column("RGB_image")[position].as_py() is None)
        assert (item.flux is None) == (table.column("spectrum")[position].as_py() is None)
        assert item.redshift == pytest.approx(table.column("redshift")[position].as_py())
    everything = views.read_objects(root, ids)
    assert any(i.rgb is None for i in everything) and any(i.flux is None for i in everything)
    with_image = next(i for i in everything if i.rgb is not None)
    assert with_image.rgb.shape == (24, 24, 3) and set(with_image.bands) == {"VIS", "NISP_Y", "NISP_J", "NISP_H"}
    with pytest.raises(DataError, match=r"no object with object_id 12345, 678"):
        views.read_objects(root, [12345, ids[0], 678])


def test_missing_modalities_are_empty_panels(sample):
    plt = need("matplotlib.pyplot")
    root, table = sample
    ids = table.column("object_id").to_pylist()
    bare = views.ObjectData(ids[0])
    fig, axes = plt.subplots(1, 3)
    views.draw_image(axes[0], bare)
    views.draw_band(axes[1], bare, "VIS")
    views.draw_spectrum(axes[2], bare)
    assert [[t.get_text() for t in ax.texts] for ax in axes] == [["no image"], ["no image"], ["no spectrum"]]
    item = next(i for i in views.read_objects(root, ids) if i.flux is not None)
    fig, ax = plt.subplots()
    views.draw_spectrum(ax, item)
    marked = sorted(line.get_xdata()[0] for line in ax.lines[2:])  # after the flux and its smoothing
    expected = sorted(where for _, where, _ in views.observed_lines(item.redshift, 3600.0, item.wavelength[-1]))
    np.testing.assert_allclose(marked, expected)
    plt.close("all")


def test_show_gallery_and_similar_write_figures(sample, tmp_path, monkeypatch, capsys):
    need("matplotlib")
    root, table = sample
    ids = table.column("object_id").to_numpy()
    code, out, _ = run_cli(monkeypatch, capsys, "show", str(ids[0]), "--data", str(root), "--out", str(tmp_path / "one.png"))
    assert code == 0 and "one.png" in out
    width, height = png_size(tmp_path / "one.png")
    assert width > 1.5 * height > 600

    scores = tmp_path / "ranked.parquet"
    pq.write_table(pa.table({"object_id": ids[::-1], "knn": np.arange(len(ids), 0, -1) / 3.0,
                             "anomaly_score": np.linspace(1, 0, len(ids))}), scores)
    assert views.read_scores(scores, 2)[1] == {"anomaly_score": [1.0, 1 - 1 / 13], "knn": [14 / 3, 13 / 3]}
    assert views.score_lines({"knn": [None], "fused": [0.123456], "truth_anomaly": ["lens"]}, 0) == [
        "knn = -", "fused = 0.1235", "truth_anomaly = lens"]
    code, _, _ = run_cli(monkeypatch, capsys, "gallery", str(scores), "--data", str(root), "--top", "5",
                         "--out", str(tmp_path / "top.png"))
    assert code == 0
    width, height = png_size(tmp_path / "top.png")
    assert width > 1200 and height > 400  # 5 objects, 3 a row: two rows

    x = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    x[3] = x[0] + 0.01  # the query's nearest neighbour
    emb = write_file(tmp_path / "emb.parquet", ids, {"joint": x})
    code, out, _ = run_cli(monkeypatch, capsys, "similar", str(emb), "--id", str(ids[0]), "--data", str(root),
                           "--k", "4", "--out", str(tmp_path / "near.png"))
    assert code == 0 and png_size(tmp_path / "near.png")[0] > 1200
    assert views.similar_objects(load_embeddings(emb), int(ids[0]), None, 4)[1][1] == ids[3]

    code, _, err = run_cli(monkeypatch, capsys, "show", "42", "--data", str(root), "--out", str(tmp_path / "x.png"))
    assert code == 1 and f"{root}: no object with object_id 42" in err
    pq.write_table(pa.table({"object_id": [7, int(ids[0])], "score": [1.0, 0.5]}), tmp_path / "bad.parquet")
    code, _, err = run_cli(monkeypatch, capsys, "gallery", str(tmp_path / "bad.parquet"), "--data", str(root),
                           "--out", str(tmp_path / "y.png"))
    assert code == 1 and "no object with object_id 7" in err
    code, _, err = run_cli(monkeypatch, capsys, "gallery", str(scores), "--data", str(root), "--scores", "nope",
                           "--out", str(tmp_path / "y.png"))
    assert code == 1 and "ranked.parquet: no column nope; it has object_id, knn, anomaly_score" in err
