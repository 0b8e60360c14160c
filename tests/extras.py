"""Tests that need an optional extra: skipped with what to install, except under CI, which installs
every extra (README's install line) and must run them: there a missing extra is an error."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# module -> what installs it
INSTALL = {
    "PIL": "pip install 'fmb[images]'",
    "matplotlib": "pip install 'fmb[plots]'",
    "astropt": "pip install 'fmb[parity]' && pip install --no-deps astropt==2.0.9",
    "aion": "pip install 'fmb[parity]'",
    "sklearn": "pip install 'fmb[eval]'",
    "astropy": "pip install 'fmb[eval]'",
    "umap": "pip install 'fmb[eval]'",
    "zuko": "pip install 'fmb[discovery]'",
    "faiss": "pip install 'fmb[discovery]'",
}


def need(module: str) -> ModuleType:
    """Import `module` (dotted names allowed), or skip naming the install command."""
    top = module.split(".")[0]
    how = INSTALL.get(top, f"pip install {top}")
    if os.environ.get("CI"):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"CI installs every extra, but {module} does not import ({exc}): {how}")
    return pytest.importorskip(module, reason=f"needs {module}: {how}")
