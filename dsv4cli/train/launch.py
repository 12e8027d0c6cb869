"""`dsv4 train` front end: validate, preflight memory, then run in-process, under torchrun, or write sbatch.

The torchrun argv comes from `dsv4cli.spec.launch_cmd.torchrun_command` (the one `dsv4 validate`
shows); command-line launch flags become `--set launch.*` overrides so the resolved spec that
every rank loads (and every checkpoint records) is the one that runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class LaunchPlan:
    """What `dsv4 train` is about to do; `problems` non-empty means exit 2 without starting anything."""

    spec_path: str
    overrides: list[str]
    spec: object = None
    world_size: int = 1
    argv: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def in_process(self) -> bool:
        return self.world_size == 1


def launch_overrides(nproc_per_node=None, nnodes=None, node_rank=None, rdzv_endpoint=None) -> list[str]:
    """Command-line launch flags -> `--set launch.*` items (None = keep the spec's value)."""
    out = []
    for key, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes), ("node_rank", node_rank)):
        if value is not None:
            out.append(f"launch.{key}={int(value)}")
    if rdzv_endpoint is not None:
        out.append(f'launch.rdzv_endpoint="{rdzv_endpoint}"')
    return out


def torchrun_launcher() -> list[str]:
    """The torchrun of this interpreter's environment (falls back to `python -m torch.distributed.run`)."""
    here = Path(sys.executable).parent / "torchrun"
    if here.is_file():
        return [str(here)]
    return [sys.executable, "-m", "torch.distributed.run"]


def plan_launch(spec_path: str, overrides: Sequence[str] = (), *, extra_args: Sequence[str] = (),
                launcher: Optional[Sequence[str]] = None, verbose: bool = False) -> LaunchPlan:
    """Validate (same rules and messages as `dsv4 validate`; unsupported features are errors) and
    build the torchrun argv; for an eval (`--eval --load DIR` in extra_args) check the checkpoint
    (every mismatched key listed with `verbose`). Imports torch only for that checkpoint check."""
    from dsv4cli.spec.check import check_spec
    from dsv4cli.spec.launch_cmd import torchrun_command

    plan = LaunchPlan(spec_path, list(overrides))
    report = check_spec(spec_path, list(overrides), None, unsupported_are_errors=True)
    plan.problems = [str(p) for p in report.errors]
    plan.warnings = [str(p) for p in report.warnings]
    if report.spec is None or plan.problems:
        return plan
    spec = report.spec
    plan.spec = spec
    plan.world_size = spec.launch.nproc_per_node * spec.launch.nnodes
    plan.argv = torchrun_command(spec, spec_path, overrides=list(overrides),
                                 launcher=launcher or torchrun_launcher()) + list(extra_args)
    load = _eval_load_arg(extra_args)
    if load is not None:
        # Before any rank starts (under torchrun a rank's exit 2 would surface as torchrun's 1) and
        # before an in-process eval builds the model or loads a tensor.
        problem = preflight_eval(spec, load, verbose)
        if problem:
            plan.problems.append(f"error: {problem}")
    return plan


def _eval_load_arg(extra_args: Sequence[str]) -> Optional[str]:
    """The checkpoint of an eval launch (`--eval --load DIR` in the entry point's arguments), else None."""
    args = list(extra_args)
    if "--eval" not in args or "--load" not in args:
        return None
    i = args.index("--load")
    return args[i + 1] if i + 1 < len(args) else None


def preflight_eval(spec, load: str, verbose: bool = False) -> Optional[str]:
    """Is the checkpoint at `load` complete, and does it hold the tensors of SPEC's model? -> problem line or None.

    First the integrity check every checkpoint reader runs (`.metadata` parses, every data file
    it names is there and long enough, Megatron's common state is sound), then the checkpoint's
    `.metadata` (names and global shapes; no tensor data, no model built, no process group) against
    the spec's parameter inventory, the check `dsv4 inspect checkpoint` makes. The mismatch line
    is summarised (counts, first few keys; every key with `verbose`) and names the convert-ckpt
    command for a legacy checkpoint.
    """
    from dsv4cli.ckpt.conformance import check_conformance
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.integrity import check_checkpoint
    from dsv4cli.ckpt.metadata import read_checkpoint_info

    try:
        info = read_checkpoint_info(load, check_checkpoint(load, loading=True))
    except CheckpointError as e:
        return str(e)
    result = check_conformance(info, spec)
    if not result.blocking():
        return None
    return f"{info.iter_dir}: checkpoint tensors do not match the spec: {result.summary(verbose)}"


def device_memory() -> tuple[int, str]:
    """(bytes available to one rank, description): CUDA device memory, else host RAM available."""
    import psutil

    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"{props.name} memory"
    except Exception:
        pass
    return int(psutil.virtual_memory().available), "available host RAM"


def preflight_memory(spec, world_size: int) -> tuple[bool, str]:
    """Compare the spec's per-rank memory estimate with the device's memory. -> (fits, message)."""
    from dsv4cli.spec.estimate import memory_per_rank

    import torch

    need = memory_per_rank(spec, world_size).total
    have, what = device_memory()
    per_node = 1 if torch.cuda.is_available() else spec.launch.nproc_per_node  # CPU ranks share RAM
    total_need = need * per_node
    gib = 2**30
    msg = (f"memory estimate {need / gib:.2f} GiB per rank x {per_node} rank(s) = {total_need / gib:.2f} GiB, "
           f"{what} {have / gib:.2f} GiB")
    return total_need <= have, msg


def preflight_device(spec) -> Optional[str]:
    """Settings this machine cannot run: -> problem line or None.

    bf16 training goes through Megatron-Core's mixed-precision optimizer, whose gradient clipping
    is CUDA-only; on CPU the run would die in the first step, so say so before starting.
    """
    import torch

    if spec.train.precision == "bf16" and not torch.cuda.is_available():
        return ('train.precision: "bf16" needs CUDA GPUs (no CUDA device here); '
                "on CPU run with --set train.precision=fp32")
    return None


def preflight_checkpoint(spec) -> Optional[str]:
    """The checkpoint a run would resume from must be complete and hold the spec's model: -> problem line or None.

    Checked in the launching process (reads `.metadata`, stats the data files, reads dsv4_spec.toml;
    loads no tensor), so a damaged or mismatched checkpoint is exit 2 before any rank starts, also
    under torchrun. A damaged or missing one is reported with the newest complete earlier checkpoint
    and the `--set checkpoint.load=...` that resumes from it.
    """
    from dsv4cli.ckpt.integrity import check_resumable, resume_advice
    from dsv4cli.train.checkpointing import (LATEST, CheckpointError, check_model_spec, latest_iteration,
                                             resolve_checkpoint)

    run_dir = Path(spec.checkpoint.dir)
    resuming_latest = not spec.checkpoint.load and (run_dir / LATEST).is_file()
    if not (spec.checkpoint.load or resuming_latest):
        return None
    try:
        iter_dir, _ = resolve_checkpoint(spec.checkpoint.load or run_dir)
    except CheckpointError as e:  # e.g. `latest` names a directory that is gone
        return str(e) + (resume_advice(run_dir, latest_iteration(run_dir)) if resuming_latest else "")
    try:
        check_model_spec(iter_dir, spec)  # first: for another model an earlier checkpoint would not help either
        check_resumable(iter_dir)
    except CheckpointError as e:
        return str(e)
    return None


def slurm_script(plan: LaunchPlan, gpus_per_node: Optional[int] = None) -> str:
    """An sbatch script that runs the same torchrun command on every node (node rank from SLURM)."""
    from dsv4cli.spec.launch_cmd import torchrun_command

    spec = plan.spec
    nnodes, nproc = spec.launch.nnodes, spec.launch.nproc_per_node
    port = spec.launch.rdzv_endpoint.rsplit(":", 1)[-1] if ":" in spec.launch.rdzv_endpoint else "29500"
    node_rank, endpoint = "@@NODE_RANK@@", "@@ENDPOINT@@"
    overrides = [o for o in plan.overrides if not o.startswith(("launch.node_rank=", "launch.rdzv_endpoint="))]
    argv = torchrun_command(spec, str(Path(plan.spec_path).resolve()), node_rank=0, rdzv_endpoint=endpoint,
                            overrides=overrides, launcher=["torchrun"])
    argv[argv.index("--node-rank") + 1] = node_rank
    inner = shlex.join(argv).replace(node_rank, '"$SLURM_NODEID"').replace(endpoint, '"$MASTER_ADDR:$MASTER_PORT"')
    name = spec.name or Path(plan.spec_path).stem
    gpus = gpus_per_node if gpus_per_node is not None else nproc
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=dsv4-{name}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        "#SBATCH --exclusive",
        f"#SBATCH --output=dsv4-{name}-%j.out",
        "# Written by `dsv4 train --slurm`: one torchrun per node; torchrun starts the ranks.",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export MASTER_PORT="${{MASTER_PORT:-{port}}}"',
        *_gpu_node_env(spec),
        f"LAUNCH={shlex.quote(inner)}",
        'srun --kill-on-bad-exit=1 bash -c "$LAUNCH"',
        "",
    ]
    return "\n".join(lines)


def _gpu_node_env(spec) -> list[str]:
    """`export` lines for what megatron needs in the ranks' environment on the (CUDA) nodes."""
    from dsv4cli.build.gpu_settings import Availability, gpu_settings

    env = gpu_settings(spec, Availability(cuda=True)).env
    return [f'export {k}="${{{k}:-{shlex.quote(v)}}}"' for k, v in sorted(env.items())]


def write_text_atomic(path: str | Path, text: str, mode: int = 0o755) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, p)


def run_torchrun(argv: Sequence[str]) -> int:
    """Run torchrun; -> its exit code.

    torchrun runs in its own session, so a terminal Ctrl-C reaches only this process. SIGTERM and
    SIGINT are forwarded to the ranks themselves (the agent's children): they save at the next step
    boundary and exit 0, and torchrun then ends cleanly. Signalling the agent instead makes it
    report a failure even though the ranks stopped as asked.
    """
    import psutil

    proc = subprocess.Popen(list(argv), start_new_session=True)

    def forward(signum, frame):
        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            ranks = []
        targets = ranks or [proc]
        for p in targets:
            try:
                p.send_signal(signum)
            except (ProcessLookupError, psutil.Error):
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
