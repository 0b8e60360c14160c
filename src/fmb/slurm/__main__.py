"""`python -m fmb.slurm [DIR]`: rewrite the shipped sbatch scripts (default: the repository's slurm/)."""

import sys
from pathlib import Path

from fmb.paths import repo_root
from fmb.slurm import write_shipped

if __name__ == "__main__":
    root = repo_root()
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else (root / "slurm" if root else None)
    if target is None:
        sys.exit("usage: python -m fmb.slurm DIR (no source checkout found)")
    print(f"wrote {len(write_shipped(target))} scripts under {target}")
