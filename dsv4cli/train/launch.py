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
from typing import Callable, Optional, Sequence

from dsv4cli.compat import device


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
        if device.cuda_available():
            import torch

            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"{props.name} memory"
    except Exception:
        pass
    return int(psutil.virtual_memory().available), "available host RAM"


def preflight_memory(spec, world_size: int) -> tuple[bool, str]:
    """Compare the spec's per-rank memory estimate with the device's memory. -> (fits, message)."""
    from dsv4cli.spec.estimate import memory_per_rank

    need = memory_per_rank(spec, world_size).total
    have, what = device_memory()
    per_node = 1 if device.cuda_available() else spec.launch.nproc_per_node  # CPU ranks share RAM
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
    if spec.train.precision == "bf16" and device.on_cpu():
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
    from dsv4cli.ckpt.conformance import check_model_spec
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.integrity import check_resumable, resume_advice
    from dsv4cli.ckpt.layout import TRACKER_FILE, latest_iteration, resolve_checkpoint

    run_dir = Path(spec.checkpoint.dir)
    resuming_latest = not spec.checkpoint.load and (run_dir / TRACKER_FILE).is_file()
    if not (spec.checkpoint.load or resuming_latest):
        return None
    try:
        iter_dir = resolve_checkpoint(spec.checkpoint.load or run_dir).iter_dir
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
                            overrides=overrides, launcher=torchrun_launcher())
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


def run_log_path(run_dir: str | Path, kind: str = "train", node_rank: Optional[int] = None) -> Path:
    """RUN_DIR/logs/KIND-YYYYmmdd-HHMMSS[-nodeR].log: where torchrun's own output of a run is kept
    (the node suffix for multi-node runs, whose nodes share the directory)."""
    import time

    node = f"-node{node_rank}" if node_rank is not None else ""
    return Path(run_dir) / "logs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}{node}.log"


def _gpu_node_env(spec) -> list[str]:
    """`export` lines for what megatron needs in the ranks' environment on the (CUDA) nodes."""
    from dsv4cli.build.gpu_settings import Availability, gpu_settings

    env = gpu_settings(spec, Availability(cuda=True)).env
    return [f'export {k}="${{{k}:-{shlex.quote(v)}}}"' for k, v in sorted(env.items())]


def _torchrun_args(argv: Sequence[str]) -> list[str]:
    """torchrun argv -> its arguments without the launcher (`torchrun` or `python -m torch.distributed.run`)."""
    argv = list(argv)
    if len(argv) > 2 and argv[1:3] == ["-m", "torch.distributed.run"]:
        return argv[3:]
    return argv[1:]


def _rank_errors(error_dir: Path) -> list[str]:
    """The `error:` lines of the lowest rank that reported any (the ranks report the same problem)."""
    for f in sorted(error_dir.glob("rank*.txt"), key=lambda p: int(p.stem[4:] or 0)):
        lines = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines
    return []


def run_torchrun(argv: Sequence[str], log_path: str | Path | None = None, *, verbose: bool = False,
                 on_start: Optional[Callable[[int], None]] = None) -> int:
    """Run torchrun; -> 0, 2 (a rank found bad input) or 1 (any other failure).

    torchrun runs through `dsv4cli.train.torchrun_agent`, which keeps torchrun's own output (log
    lines, tracebacks, the elastic error block) in `log_path` (a temporary file if None, removed
    after success) and maps the ranks' exit codes. The ranks write to this process's stdout and
    stderr directly; their `error:` lines go to per-rank files and are printed here once, followed
    by where the log is. `verbose` shows torchrun's output and the known library warnings too
    (dsv4cli.noise). `on_start(pid)` is called with torchrun's pid once it runs.

    torchrun runs in its own session, so a terminal Ctrl-C reaches only this process. SIGTERM and
    SIGINT are forwarded to the ranks themselves (the agent's children): they save at the next step
    boundary and exit 0, and torchrun then ends cleanly. Signalling the agent instead makes it
    report a failure even though the ranks stopped as asked.
    """
    import tempfile

    import psutil

    from dsv4cli.noise import VERBOSE_ENV
    from dsv4cli.train.entry import ERROR_DIR_ENV

    temporary = log_path is None
    if temporary:
        fd, name = tempfile.mkstemp(prefix="dsv4-torchrun-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {shlex.join(list(argv))}\n")
    with tempfile.TemporaryDirectory(prefix="dsv4-errors-") as error_dir:
        env = dict(os.environ, **{ERROR_DIR_ENV: error_dir})
        if verbose:
            env[VERBOSE_ENV] = "1"
        cmd = [sys.executable, "-m", "dsv4cli.train.torchrun_agent", str(log_path), *_torchrun_args(argv)]
        proc = subprocess.Popen(cmd, start_new_session=True, env=env)
        if on_start is not None:
            on_start(proc.pid)

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
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        for line in _rank_errors(Path(error_dir)):
            print(line if line.startswith("error:") else f"error: {line}", file=sys.stderr, flush=True)
    code = code if code in (0, 2) else 1
    if code == 0 and temporary:
        log_path.unlink(missing_ok=True)
    elif code != 0:
        print(f"torchrun's log (its traceback and error report): {log_path}", file=sys.stderr, flush=True)
    return code


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def run_plan(plan: LaunchPlan, *, verbose: bool = False, log=print) -> int:
    """Run a checked plan while holding its run directory's lock (dsv4cli.train.runlock) -> exit code.

    One process runs in-process; more run under torchrun, whose own output goes to
    RUN_DIR/logs/train-*.log. Raises RunLocked (exit 2) before writing anything when another
    run holds the directory. Only node 0 of a multi-node run takes the lock.
    """
    from dsv4cli.train.runlock import RunLock

    spec = plan.spec
    lock = RunLock(spec.checkpoint.dir).acquire() if spec.launch.node_rank == 0 else None
    try:
        for note in lock.notes if lock else []:
            log(f"note: {note}")
        if plan.in_process:
            from dsv4cli.train.entry import run

            try:  # until the training loop installs its own handler: SIGTERM ends the run, lock released
                old = signal.signal(signal.SIGTERM, _raise_exit)
            except ValueError:  # not the main thread
                old = None
            try:
                return run(plan.spec_path, plan.overrides, verbose=verbose)
            finally:
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
        from dsv4cli.build.gpu_settings import export_launch_env

        export_launch_env(spec)  # e.g. CUDA_DEVICE_MAX_CONNECTIONS=1 for the ranks (CUDA, tp or cp > 1)
        log(shlex.join(plan.argv))
        node = spec.launch.node_rank if spec.launch.nnodes > 1 else None
        return run_torchrun(plan.argv, run_log_path(spec.checkpoint.dir, node_rank=node), verbose=verbose,
                            on_start=lock.add_child if lock else None)
    finally:
        if lock:
            lock.release()

