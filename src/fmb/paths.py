"""Where this machine keeps data and weights: `paths_local.yaml`, referenced as `${paths.NAME}`.

Lookup order: `--paths FILE`, `$FMB_PATHS`, `./paths_local.yaml`, the repository root.
Relative entries are relative to the file that holds them. Entries named `slurm_*` are job
settings for `fmb slurm` (account, QoS, modules), not paths: they are read as written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmb.config import read_yaml
from fmb.errors import ConfigError

PATHS_FILENAME = "paths_local.yaml"
SETTING_PREFIX = "slurm_"  # entries with this prefix are settings, never resolved as paths


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable installs), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "configs").is_dir():
            return parent
    return None


def configs_dir() -> Path:
    """The shipped recipes: `configs/` of the checkout, or the copy inside an installed wheel."""
    root = repo_root()
    if root is not None:
        return root / "configs"
    return Path(__file__).resolve().parent / "_configs"


@dataclass
class PathsFile:
    file: Path | None
    entries: dict[str, Any] = field(default_factory=dict)
    searched: list[str] = field(default_factory=list)

    def resolved(self) -> dict[str, str | None]:
        return {name: self._absolute(value) for name, value in self.entries.items()
                if not name.startswith(SETTING_PREFIX)}

    def setting(self, name: str) -> Any:
        """A `slurm_*` setting as written in the file (None when absent or empty)."""
        value = self.entries.get(name)
        return None if value in (None, "", []) else value

    def _absolute(self, value: Any) -> str | None:
        if value in (None, ""):
            return None
        path = Path(os.path.expandvars(str(value))).expanduser()
        if not path.is_absolute() and self.file is not None:
            path = self.file.parent / path
        return str(path)


def find_paths_file(explicit: str | Path | None = None) -> PathsFile:
    """Locate and read paths_local.yaml (see the module docstring for the order)."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--paths", Path(explicit)))
    env = os.environ.get("FMB_PATHS")
    if env:
        candidates.append(("$FMB_PATHS", Path(env)))
    candidates.append(("current directory", Path.cwd() / PATHS_FILENAME))
    root = repo_root()
    if root is not None:
        candidates.append(("repository root", root / PATHS_FILENAME))

    searched = [f"{path} ({why})" for why, path in candidates]
    for why, path in candidates:
        if path.is_file():
            data = read_yaml(path) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of NAME: /path entries")
            return PathsFile(file=path.resolve(), entries={str(k): v for k, v in data.items()}, searched=searched)
        if why in ("--paths", "$FMB_PATHS"):
            raise ConfigError(f"paths file given by {why} does not exist: {path}")
    return PathsFile(file=None, entries={}, searched=searched)
