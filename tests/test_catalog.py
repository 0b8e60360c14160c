"""Catalogue targets (FITS, parquet, CSV) joined to embeddings on the object id."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from fmb.errors import ConfigError, DataError
from fmb.evaluation.catalog import join, parse_mapping, read_catalog
from tests.cli_runner import run_cli
from tests.extras import need
from tests.test_evaluation import planted, write_file


def catalogue_columns():
    """Ids 1000..1199 reversed, then 5 ids no embedding has; Z with sentinels, LOGM with NaN, a text class."""
    ids = np.concatenate([np.arange(1199, 999, -1), np.arange(5000, 5005)])
    z = np.linspace(0.1, 2.0, len(ids))
    z[[0, 1, 2]] = -99.0  # "no measurement"
    mass = np.full(len(ids), 10.5)
    mass[3] = np.nan
    morph = np.array(["E", "S"] * (len(ids) // 2) + ["E"])
    return ids, z, mass, morph


def write_fits(path):
    astropy_table = need("astropy.table")
    ids, z, mass, morph = catalogue_columns()
    table = astropy_table.Table({"OBJID": ids.astype(">i8"), "Z": z, "LOGM": mass, "MORPH": morph})
    table["LOGM"].unit = "solMass"
    table.write(path, format="fits")
    return path


@pytest.mark.parametrize("kind", ["fits", "parquet", "csv"])
def test_every_format_joins_with_counts_and_sentinels(tmp_path, kind, caplog):
    ids, z, mass, morph = catalogue_columns()
    path = tmp_path / f"cat.{kind}"
    if kind == "fits":
        write_fits(path)
    else:
        table = pa.table({"OBJID": ids, "Z": z, "LOGM": mass, "MORPH": morph})
        pq.write_table(table, path) if kind == "parquet" else pa_csv.write_csv(table, path)
    catalog = read_catalog(path, "OBJID", parse_mapping(["redshift=Z", "mass=LOGM", "morph=MORPH"]))
    assert catalog.missing == {"redshift": 3, "mass": 1, "morph": 0}
    if kind == "fits":
        assert catalog.units == {"mass": "solMass"}
    embedded = np.arange(990, 1100)  # 10 ids without a catalogue row
    with caplog.at_level("INFO", logger="fmb"):
        joined = join(catalog, embedded, "test.parquet")
    assert "100 of 110 objects of test.parquet matched; 10 without a catalogue row, 105 catalogue rows unused" in caplog.text
    row_of = {int(i): n for n, i in enumerate(ids)}
    assert np.isnan(joined["redshift"][:10]).all()  # unmatched
    assert joined["redshift"][15] == pytest.approx(z[row_of[1005]])
    assert joined["morph"][15] == morph[row_of[1005]] and joined["morph"][0] is None
    # 1199, 1198, 1197 carry the sentinel: outside the embedded ids here, so all 100 matched are usable
    assert np.isfinite(joined["redshift"][10:]).all()


def test_bad_catalogues_name_the_file(tmp_path):
    ids, z, mass, _ = catalogue_columns()
    path = tmp_path / "cat.parquet"
    pq.write_table(pa.table({"OBJID": ids, "Z": z, "LOGM": mass}), path)
    with pytest.raises(DataError, match=r"cat\.parquet: no column 'OBJ_ID' \(closest: OBJID\)"):
        read_catalog(path, "OBJ_ID", {"redshift": "Z"})
    with pytest.raises(DataError, match=r"no column 'ZSPEC'"):
        read_catalog(path, "OBJID", {"redshift": "ZSPEC"})
    duplicated = tmp_path / "dup.csv"
    pa_csv.write_csv(pa.table({"OBJID": [1, 2, 2, 3, 3, 3], "Z": [0.1] * 6}), duplicated)
    with pytest.raises(DataError, match=r"dup\.csv: 3 duplicate values in id column 'OBJID' \(2 ids repeated, e\.g\. 2, 3\)"):
        read_catalog(duplicated, "OBJID", {"redshift": "Z"})
    sentinel_only = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"OBJID": [1, 2, 3], "Z": [-99.0, np.nan, -999.0]}), sentinel_only)
    catalog = read_catalog(sentinel_only, "OBJID", {"redshift": "Z"})
    with pytest.raises(DataError, match=r"target 'redshift' has no usable value for the 3 matched objects.*3 catalogue rows"):
        join(catalog, np.array([1, 2, 3]), "a.parquet")
    with pytest.raises(DataError, match="none of the 2 object ids"):
        join(catalog, np.array([7, 8]), "a.parquet")
    with pytest.raises(ConfigError, match="target=COLUMN"):
        parse_mapping(["=Z"])
    with pytest.raises(DataError, match="unknown catalogue format"):
        (tmp_path / "cat.txt").write_text("x")
        read_catalog(tmp_path / "cat.txt", "OBJID", {"redshift": "Z"})


def test_evaluate_takes_targets_from_a_fits_catalogue(tmp_path, monkeypatch, capsys):
    need("sklearn")
    x, z, _ = planted(n=200)
    ids = np.arange(1000, 1200)
    emb = write_file(tmp_path / "a.parquet", ids, {"image": x})  # no targets of its own
    astropy_table = need("astropy.table")
    z_cat = z.copy()
    z_cat[:5] = -99.0
    astropy_table.Table({"OBJID": ids[::-1], "ZSPEC": z_cat[::-1]}).write(tmp_path / "cat.fits")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", str(emb), "--catalog", str(tmp_path / "cat.fits"),
                             "--id-column", "OBJID", "--map", "redshift=ZSPEC", "--target", "redshift",
                             "--folds", "3", "--fractions", "1.0", "--probes", "linear", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    row = next(line for line in out.splitlines() if "| linear | 100% | r2 |" in line)
    assert row.endswith("| 195 |")  # the 5 sentinel rows are excluded
    assert float(row.split("|")[7].split()[0]) > 0.95
    assert "200 of 200 objects of 1 embedding file(s) matched" in err
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", str(emb), "--map", "redshift=ZSPEC", "--target", "redshift")
    assert code == 2 and "--catalog" in err
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", str(emb), "--target", "redshift")
    assert code == 1 and "no target column 'redshift'" in err and "--catalog FILE" in err
