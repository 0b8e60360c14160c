"""Upstream implementations (AION, astroPT, AstroCLIP, AstroM3) for parity checks; fmb never needs them.

An upstream is found as a populated git submodule `external/<dir>` of the checkout (pinned in
.gitmodules; `git submodule update --init` fills it) or, failing that, as an installed package.
The pinned checkout wins: it is the exact code the parity tests were written against.

Importing from external/ happens inside `with upstream(name):`. The block puts the checkout's
source root first on sys.path and sets aside any already-imported module of the same name (an
installed copy); on exit it restores sys.path exactly and removes every module the block
imported, putting back what it set aside. A context manager rather than a spec built from a
file location because AstroM3 is not a package: its files import one another as top-level
modules (`from informer import ...`), which needs the directory on sys.path while they import.
Removing what was imported afterwards keeps generic names (`model`, `utils`) from shadowing
anything later; code that imports lazily at call time must therefore be called inside the block.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fmb.errors import FmbError
from fmb.paths import repo_root


@dataclass(frozen=True)
class External:
    directory: str  # external/<directory>, as in .gitmodules
    url: str
    source: str  # directory of the checkout that goes on sys.path
    module: str  # a top-level module it provides (proves the checkout is populated)
    package: str | None  # the name it installs under with pip, if it is a package

    def marker(self, root: Path) -> Path:
        base = root / self.directory / self.source
        return base / self.module / "__init__.py" if self.package else base / f"{self.module}.py"


# Keyed by fmb family name.
EXTERNALS: dict[str, External] = {
    "aion": External("AION", "https://github.com/PolymathicAI/AION", ".", "aion", "aion"),
    "astropt": External("astroPT", "https://github.com/Smith42/astroPT", "src", "astropt", "astropt"),
    "astroclip": External("AstroCLIP", "https://github.com/PolymathicAI/AstroCLIP", ".", "astroclip", "astroclip"),
    "astrom3": External("AstroM3", "https://github.com/MeriDK/AstroM3", "src", "model", None),
}


class UpstreamMissing(FmbError):
    """The upstream code of a family is neither in external/ nor installed."""


@dataclass(frozen=True)
class Found:
    name: str
    where: str  # "external", "installed" or "absent"
    path: Path | None  # source root on sys.path (external) or the installed module's location

    @property
    def present(self) -> bool:
        return self.where != "absent"


def externals_dir() -> Path | None:
    root = repo_root()
    return root / "external" if root is not None else None


def find_upstream(name: str, external_dir: Path | None = None) -> Found:
    """Where the upstream code of family `name` is: the pinned checkout first, then an installed package."""
    if name not in EXTERNALS:
        raise FmbError(f"no upstream is known for '{name}'; known: {', '.join(EXTERNALS)}")
    spec = EXTERNALS[name]
    base = external_dir if external_dir is not None else externals_dir()
    if base is not None and spec.marker(base).is_file():
        return Found(name, "external", base / spec.directory / spec.source)
    if spec.package is not None:
        # find_spec of a top-level name imports nothing.
        installed = importlib.util.find_spec(spec.package)
        if installed is not None and installed.origin is not None:
            return Found(name, "installed", Path(installed.origin).parent)
    return Found(name, "absent", None)


def upstream_status(external_dir: Path | None = None) -> list[Found]:
    return [find_upstream(name, external_dir) for name in EXTERNALS]


@contextmanager
def upstream(name: str, external_dir: Path | None = None) -> Iterator[Found]:
    """Make family `name`'s upstream importable inside the block (see the module docstring)."""
    found = find_upstream(name, external_dir)
    spec = EXTERNALS[name]
    if not found.present:
        hint = f"git submodule update --init external/{spec.directory}"
        if spec.package:
            hint += f", or pip install the upstream '{spec.package}' package"
        raise UpstreamMissing(f"upstream code of '{name}' not found: {hint}")
    if found.where == "installed":
        yield found
        return
    saved_path = list(sys.path)
    before = set(sys.modules)
    shadowed = {key: sys.modules.pop(key) for key in list(sys.modules) if _provided_by(key, spec.module)}
    sys.path.insert(0, str(found.path))
    importlib.invalidate_caches()
    try:
        yield found
    finally:
        sys.path[:] = saved_path
        for key in set(sys.modules) - before:
            del sys.modules[key]
        for key in [k for k in sys.modules if _provided_by(k, spec.module)]:
            del sys.modules[key]  # a same-named module imported in the block
        sys.modules.update(shadowed)
        importlib.invalidate_caches()


def _provided_by(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")
