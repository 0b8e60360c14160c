"""Upstream code in external/ or installed: found, imported inside a block, nothing left on sys.path."""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest

from fmb import cli
from fmb.externals import EXTERNALS, UpstreamMissing, find_upstream, upstream, upstream_status

ROOT = Path(__file__).resolve().parents[1]


def populate(external: Path) -> None:
    """A checkout of astroPT (src/ layout package) and of AstroM3 (flat modules importing each other)."""
    package = external / "astroPT" / "src" / "astropt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("ORIGIN = 'external'\n")
    (package / "model.py").write_text("from astropt import ORIGIN\n\nclass GPT:\n    origin = ORIGIN\n")
    flat = external / "AstroM3" / "src"
    flat.mkdir(parents=True)
    (flat / "informer.py").write_text("WIDTH = 7\n")
    (flat / "model.py").write_text("from informer import WIDTH\n\nclass Informer:\n    width = WIDTH\n")


def test_external_package_is_imported_inside_the_block_only(tmp_path):
    populate(tmp_path / "external")
    found = find_upstream("astropt", tmp_path / "external")
    assert found.where == "external" and found.path == tmp_path / "external" / "astroPT" / "src"
    path_before = list(sys.path)
    installed = sys.modules.get("astropt")
    with upstream("astropt", tmp_path / "external"):
        from astropt.model import GPT

        assert GPT.origin == "external"
        assert sys.modules["astropt"].__file__ == str(tmp_path / "external/astroPT/src/astropt/__init__.py")
    assert sys.path == path_before
    assert sys.modules.get("astropt") is installed  # an installed copy imported before is back, untouched
    assert "astropt.model" not in sys.modules or sys.modules["astropt.model"].__file__ != str(
        tmp_path / "external/astroPT/src/astropt/model.py")
    assert GPT.origin == "external"  # what was imported keeps working after the block


def test_flat_upstream_modules_import_each_other_and_are_removed_after(tmp_path):
    populate(tmp_path / "external")
    path_before = list(sys.path)
    with upstream("astrom3", tmp_path / "external") as found:
        import model

        assert found.where == "external" and model.Informer.width == 7
    assert sys.path == path_before
    assert "model" not in sys.modules and "informer" not in sys.modules


def test_absent_upstream_is_reported_and_refused(tmp_path):
    (tmp_path / "external").mkdir()
    found = find_upstream("astrom3", tmp_path / "external")  # not a pip package: external/ only
    assert found.where == "absent" and not found.present
    with pytest.raises(UpstreamMissing, match=r"git submodule update --init external/AstroM3"):
        with upstream("astrom3", tmp_path / "external"):
            pass
    assert [f.name for f in upstream_status(tmp_path / "external")] == list(EXTERNALS)


def test_gitmodules_pins_every_external():
    parser = configparser.ConfigParser()
    parser.read_string((ROOT / ".gitmodules").read_text().replace("\t", ""))
    modules = {parser[s]["path"]: parser[s]["url"] for s in parser.sections()}
    assert modules == {f"external/{e.directory}": f"{e.url}.git" for e in EXTERNALS.values()}


def test_doctor_reports_upstreams(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fmb", "doctor"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr().out
    assert info.value.code == 0
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("upstream ")]
    assert [parts[1] for parts in lines] == list(EXTERNALS)
    for parts, found in zip(lines, upstream_status(), strict=True):
        assert parts[2].startswith({"external": "present", "installed": "installed", "absent": "absent"}[found.where])
