"""sbatch scripts for `fmb retrain` and `fmb embed` on Jean-Zay and Candide, rendered from one template.

The template (`templates/job.sbatch`, package data found with importlib.resources) launches
one srun task per GPU, sends SIGUSR1 to the tasks 120 s before the time limit and requeues
the job when fmb stops gracefully (exit 75), so a long training run continues across time
limits with `--resume`, and an embedding export with the chunks it has not written yet.
Account, QoS, partition and module lines come from `slurm_*` entries of paths_local.yaml or
from the command line. Any registered family renders; `slurm/` in the repository keeps a few
readable examples (`shipped_jobs()`), which a test keeps identical to what is rendered today.

Why srun and not torchrun: torchrun's agent turns a worker's exit code 75 into its own
failure code and gives workers only 30 s after SIGTERM, so the requeue decision and the
end-of-job checkpoint could not be relied on.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fmb.errors import ConfigError

MAX_REQUEUES = 20  # requeues of one job before a person must look


@dataclass(frozen=True)
class NodeKind:
    gpus: int  # GPUs per node
    cpus_per_gpu: int  # physical cores per GPU (one task per GPU gets them)


@dataclass(frozen=True)
class Cluster:
    name: str
    title: str
    node_kinds: dict[str | None, NodeKind]  # by constraint; None: no constraint
    default_constraint: str | None
    default_time: str
    runs_base: str  # default parent of the run directory, expanded by bash on the node
    account_required: bool
    jean_zay: bool = False  # account suffixed @<constraint>, arch/<constraint> module, nomultithread


CLUSTERS: dict[str, Cluster] = {
    # IDRIS Jean-Zay: A100 nodes have 8 GPUs and 64 cores, H100 nodes 4 GPUs and 96 cores.
    # Hours are charged to <project>@a100 / <project>@h100; t3 QoS allow 20 h per job.
    "jean-zay": Cluster(
        name="jean-zay", title="Jean-Zay",
        node_kinds={"a100": NodeKind(8, 8), "h100": NodeKind(4, 24)},
        default_constraint="a100", default_time="20:00:00", runs_base="$SCRATCH/fmb/runs",
        account_required=True, jean_zay=True,
    ),
    # IAP Candide: no hardware is assumed beyond 4-GPU nodes; pass --gpus-per-node,
    # --cpus-per-task and set slurm_partition for the nodes you use (see `sinfo`).
    "candide": Cluster(
        name="candide", title="Candide",
        node_kinds={None: NodeKind(4, 8)},
        default_constraint=None, default_time="24:00:00", runs_base="$HOME/fmb/runs",
        account_required=False,
    ),
}

SHIPPED_ACCOUNT = "YOUR_PROJECT"  # what shipped Jean-Zay scripts charge: `sbatch -A abc@a100` overrides

# After srun, for training: a rank killed while the others stopped can make srun report another
# code; the run's own status file (written by rank 0) says whether it stopped gracefully.
_STATUS_CHECK = """if [ "$status" -ne 0 ] && [ "$status" -ne 75 ]; then
    recorded=0
    python -m fmb status "$RUN_DIR" >/dev/null 2>&1 || recorded=$?
    if [ "$recorded" -eq 75 ]; then status=75; fi
fi
"""
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d\d){1,2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@/+-]+$")


@dataclass(frozen=True)
class SlurmJob:
    model: str
    cluster: str
    nodes: int = 1
    gpus_per_node: int | None = None  # None: every GPU of a node
    constraint: str | None = None  # None: the cluster's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()  # shell lines after the modules (e.g. activate a venv)
    time: str | None = None
    out: str | None = None  # run directory; None: ${FMB_RUNS:-<cluster runs_base>}/<model>
    cpus_per_task: int | None = None
    retrain_args: tuple[str, ...] = ()  # extra `fmb retrain` / `fmb embed` arguments, e.g. --set k=v
    max_requeues: int = MAX_REQUEUES
    job: str = "retrain"  # retrain | embed
    checkpoint: str | None = None  # embed: the run (or step) directory to embed with


def cluster_for(name: str) -> Cluster:
    if name not in CLUSTERS:
        raise ConfigError(f"unknown cluster '{name}'; choose one of {', '.join(CLUSTERS)}")
    return CLUSTERS[name]


def _node_kind(job: SlurmJob, cluster: Cluster) -> tuple[str | None, NodeKind]:
    constraint = job.constraint or cluster.default_constraint
    if cluster.jean_zay or constraint in cluster.node_kinds:
        if constraint not in cluster.node_kinds:
            known = ", ".join(str(c) for c in cluster.node_kinds)
            raise ConfigError(f"--constraint {constraint}: {cluster.title} GPU nodes are {known}")
        return constraint, cluster.node_kinds[constraint]
    return constraint, cluster.node_kinds[None]


def _checked(job: SlurmJob, cluster: Cluster) -> None:
    if not re.fullmatch(r"[a-z0-9_-]+", job.model):
        raise ConfigError(f"model name '{job.model}' is not a family name")
    if job.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, not {job.nodes}")
    if job.gpus_per_node is not None and job.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, not {job.gpus_per_node}")
    if job.time is not None and not _TIME.match(job.time):
        raise ConfigError(f"--time '{job.time}' is not [D-]HH:MM[:SS]")
    for label, value in (("account", job.account), ("qos", job.qos), ("partition", job.partition),
                         ("constraint", job.constraint), *(("module", m) for m in job.modules)):
        if value is not None and not _NAME.match(value):
            raise ConfigError(f"slurm {label} '{value}' has characters that do not belong in a name")
    for label, value in (("--out", job.out), ("--checkpoint", job.checkpoint)):
        if value is not None and re.search(r'["`\\\n]', value):
            raise ConfigError(f"{label} '{value}' may not contain quotes, backquotes, backslashes or newlines")
    if job.job not in ("retrain", "embed"):
        raise ConfigError(f"--job {job.job}: choose retrain or embed")
    if job.job == "embed" and not (job.checkpoint and job.out):
        raise ConfigError("an embed job needs --checkpoint (the run to embed with) and --out (the parquet file)")


def _account(job: SlurmJob, cluster: Cluster, constraint: str | None) -> str | None:
    if not job.account:
        if cluster.account_required:
            raise ConfigError(
                f"{cluster.title} jobs need an account: set slurm_account in paths_local.yaml "
                "(your project, e.g. abc) or pass --account"
            )
        return None
    # Jean-Zay charges GPU hours per kind: project abc becomes abc@a100 on A100 nodes.
    if cluster.jean_zay and "@" not in job.account:
        return f"{job.account}@{constraint}"
    return job.account


def job_label(job: SlurmJob) -> str:
    """File-name label: [embed-]<model>[-<constraint>]-<nodes>x<gpus>."""
    cluster = cluster_for(job.cluster)
    constraint, kind = _node_kind(job, cluster)
    gpus = job.gpus_per_node or kind.gpus
    what = "embed" if job.job == "embed" else None
    return "-".join(part for part in (what, job.model, constraint, f"{job.nodes}x{gpus}") if part)


def render(job: SlurmJob) -> str:
    """The sbatch script for one job (raises ConfigError naming what is missing or wrong)."""
    cluster = cluster_for(job.cluster)
    _checked(job, cluster)
    constraint, kind = _node_kind(job, cluster)
    gpus = job.gpus_per_node or kind.gpus
    if gpus > kind.gpus and cluster.jean_zay:
        raise ConfigError(f"{cluster.title} {constraint} nodes have {kind.gpus} GPUs, not {gpus}")
    cpus = job.cpus_per_task or kind.cpus_per_gpu
    account = _account(job, cluster, constraint)

    directives = []
    if account:
        directives.append(f"--account={account}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if constraint:
        directives.append(f"-C {constraint}")
    if job.qos:
        directives.append(f"--qos={job.qos}")
    if cluster.jean_zay:
        directives.append("--hint=nomultithread")  # one task per physical core, as IDRIS asks

    environment = []
    if cluster.jean_zay:
        # arch/<kind> first: it selects the module tree built for these nodes.
        environment += ["module purge", f"module load arch/{constraint}"]
    environment += [f"module load {m}" for m in job.modules]
    environment += list(job.setup)
    if not job.modules and not job.setup:
        environment.append("# No python environment configured: set slurm_modules / slurm_setup in "
                           "paths_local.yaml (fmb must import on the compute node, offline).")

    where = cluster.title + (f" {constraint.upper()}" if constraint else "")
    command = f"fmb slurm {job.model} --cluster {cluster.name}"
    if constraint and constraint != cluster.default_constraint:
        command += f" --constraint {constraint}"
    command += f" --nodes {job.nodes} --gpus-per-node {gpus}"
    if job.job == "embed":
        command += " --job embed"
        # Logs go next to the embeddings; the export resumes from <out>.parts/ by itself.
        log_dir = f'$(dirname "{job.out}")'
        fmb = f'embed {job.model} --checkpoint "{job.checkpoint}" --out "{job.out}"'
    else:
        log_dir = job.out or f"${{FMB_RUNS:-{cluster.runs_base}}}/{job.model}"
        fmb = f'retrain {job.model} --out "$RUN_DIR" --resume --no-progress'
    values = {
        "job": job.job,
        "model": job.model,
        "where": where,
        "command": command,
        "job_name": f"fmb-{job.job}-{job.model}",
        "directives": "".join(f"#SBATCH {d}\n" for d in directives),
        "nodes": str(job.nodes),
        "gpus_per_node": str(gpus),
        "cpus_per_task": str(cpus),
        "time": job.time or cluster.default_time,
        "run_dir": log_dir if job.job == "embed" else (job.out or f"${{FMB_RUNS:-{cluster.runs_base}}}/{job.model}"),
        "fmb": fmb,
        "status_check": "" if job.job == "embed" else _STATUS_CHECK,
        "max_requeues": str(job.max_requeues),
        "environment": "".join(line + "\n" for line in environment),
        "retrain_args": "".join(" " + shlex.quote(a) for a in job.retrain_args),
    }
    return _fill(_template(), values)


def _template() -> str:
    return resources.files(__package__).joinpath("templates", "job.sbatch").read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    names = set(re.findall(r"\{\{(\w+)\}\}", template))
    if names != set(values):
        raise ValueError(f"template placeholders {sorted(names)} do not match values {sorted(values)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def shipped_jobs() -> dict[str, SlurmJob]:
    """The readable examples kept in the repository's slurm/ directory, by path relative to it: one
    training and one embedding job per cluster (everything else is rendered on demand)."""
    jobs = {}
    for cluster, constraint, gpus in (("jean-zay", "a100", 8), ("candide", None, 4)):
        account = SHIPPED_ACCOUNT if cluster == "jean-zay" else None
        for kind in ("retrain", "embed"):
            extra = {"checkpoint": "$SCRATCH/fmb/runs/astropt", "out": "$SCRATCH/fmb/embeddings/astropt.parquet"} \
                if kind == "embed" else {}
            job = SlurmJob(model="astropt", cluster=cluster, nodes=1, gpus_per_node=gpus, constraint=constraint,
                           account=account, job=kind, **extra)
            jobs[f"{cluster}/{job_label(job)}.sbatch"] = job
    return jobs


def write_shipped(directory: Path) -> list[Path]:
    """(Re)write the shipped scripts under `directory` (the repository's slurm/)."""
    written = []
    for relative, job in shipped_jobs().items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(job), encoding="utf-8")
        written.append(path)
    return written

