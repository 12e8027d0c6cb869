"""The training loop: steps, held-out evaluation, checkpoints, exit_interval, signals, NaN guard.

Runs in every rank (torchrun) or in-process for one process. Exit codes: 0 done or stopped
cleanly (exit_interval, SIGTERM/SIGINT after saving), 1 runtime failure (non-finite loss),
2 bad input (checkpoint that does not fit the spec, bad data settings).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dsv4cli.compat import device


class TrainingStopped(RuntimeError):
    """Non-finite loss or another runtime failure (exit 1)."""


class _StopFlag:
    """SIGTERM/SIGINT -> remember the signal; the loop saves at the next step boundary."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up immediately
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _checkpoint_to_resume(spec) -> Optional[Path]:
    """checkpoint.load, else the run directory's latest checkpoint (None: a fresh run)."""
    from dsv4cli.ckpt.layout import TRACKER_FILE, resolve_checkpoint

    run_dir = Path(spec.checkpoint.dir)
    if spec.checkpoint.load or (run_dir / TRACKER_FILE).is_file():
        return resolve_checkpoint(spec.checkpoint.load or run_dir).iter_dir
    return None


def train(spec, log=print) -> int:
    """Train `spec` in this process (one rank of the job). -> exit code."""
    from dsv4cli.ckpt.conformance import check_model_spec, check_tensors, expected_shapes
    from dsv4cli.ckpt.integrity import check_resumable
    from dsv4cli.ckpt.layout import iter_dir_name, latest_iteration
    from dsv4cli.ckpt.load import load_checkpoint
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.spec.load import spec_to_toml
    from dsv4cli.train.data import build_sources
    from dsv4cli.train.feeding import BatchFeeder
    from dsv4cli.train.metrics import MetricsLogger, format_line, mfu, peak_memory_gb
    from dsv4cli.train.runtime import build_runtime, heldout_loss, params_synced
    from dsv4cli.train.step import ModelParts, train_step
    from dsv4cli.train.summary import nothing_to_do, shown, summary_lines

    t = spec.train
    resume_dir = _checkpoint_to_resume(spec)
    if resume_dir is not None:
        check_model_spec(resume_dir, spec)  # before any process group work: exit 2 everywhere
        check_resumable(resume_dir)  # (`dsv4 train` checked both before starting; this covers the entry point)

    rt = build_runtime(spec)
    parts = ModelParts.collect(rt)
    rank = dist.get_rank()
    is_logger = rank == 0
    layout = rt.dims.checkpoint_layout()
    spec_toml = spec_to_toml(spec)
    say = log if is_logger else (lambda *_: None)

    progress = TrainProgress()
    if resume_dir is not None:
        check_tensors(resume_dir, expected_shapes(rt.chunks))
        progress, notes = load_checkpoint(resume_dir, rt.chunks, rt.optimizer, rt.scheduler, layout,
                                          load_optimizer=spec.checkpoint.load_optimizer)
        for n in notes:
            say(f"note: {n}")
        say(f"resumed from {shown(resume_dir)} at step {progress.iteration} ({progress.tokens_seen:,} tokens seen)")

    data = build_sources(spec)
    dp = rt.dims.dp
    feeder = BatchFeeder(rt, data.train)  # first/last stages, TP rank 0 reads; GPU: pinned + read-ahead
    tokens_per_step = t.global_batch_size * spec.model.seq_length
    flops_per_token = _flops_per_token(spec)
    run_dir = Path(spec.checkpoint.dir)

    params = sum(p.numel() for c in rt.chunks for p in c.parameters())
    say(
        f"dsv4 train: {spec.name or 'run'} | {params:,} parameters on rank 0 | "
        f"world {rt.dims.world} (tp {rt.dims.tp}, pp {rt.dims.pp}, dp {dp}) | "
        f"{tokens_per_step:,} tokens/step | run dir {shown(run_dir)}"
    )
    logger = MetricsLogger(run_dir, t.steps, progress.iteration) if is_logger else None
    stop = _StopFlag()
    stop.install()
    start_iteration = progress.iteration
    window_time, window_steps = 0.0, 0
    started, last_loss, last_eval, stopped = time.perf_counter(), None, None, None

    def save(reason: str) -> None:
        with params_synced(rt):  # overlapped parameter gathers (GPU) finished first
            path = save_checkpoint(run_dir, rt.chunks, rt.optimizer, rt.scheduler, progress, spec_toml, layout,
                                   keep_last=spec.checkpoint.keep_last)
        if logger:
            logger.print(f"saved checkpoint {shown(path)} ({reason})")

    if progress.iteration >= t.steps:
        say(nothing_to_do(spec, shown(run_dir), progress.iteration))
    try:
        last_saved = progress.iteration if resume_dir is not None else -1
        while progress.iteration < t.steps:
            t0 = time.perf_counter()
            batches = feeder.get(progress.consumed_samples)
            result = train_step(rt, parts, batches, progress.iteration, stop.signum is not None)
            loss, mtp, stop_now, indexer_loss = result.values
            grad_norm, moe_loads = result.grad_norm, result.moe_loads
            device.synchronize()
            dt = time.perf_counter() - t0
            if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
                last = latest_iteration(run_dir)
                where = f"; the last good checkpoint is {run_dir}/{iter_dir_name(last)}" if last is not None else ""
                raise TrainingStopped(
                    f"non-finite loss at step {progress.iteration + 1} (loss {loss}, grad norm {grad_norm}); "
                    f"stopped without saving{where}"
                )
            progress.iteration += 1
            progress.consumed_samples += t.global_batch_size
            progress.tokens_seen += tokens_per_step
            window_time += dt
            window_steps += 1
            step = progress.iteration
            last_loss = loss

            eval_loss = None
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                eval_loss, eval_mtp, _ = heldout_loss(rt, data.valid, t.eval_batches)
                last_eval = (step, eval_loss)
            if logger:
                logger.advance(step)
            due = step % t.log_interval == 0 or step == t.steps or eval_loss is not None or stop_now
            # The first step of a run is shown (not recorded) so a log file or pipe shows progress at once.
            if logger and (due or step == start_iteration + 1):
                step_time = window_time / max(window_steps, 1)
                tps = tokens_per_step / step_time if step_time > 0 else 0.0
                rec = {
                    "step": step,
                    "loss": loss,
                    "mtp_losses": mtp,
                    "grad_norm": grad_norm,
                    "lr": rt.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": tps,
                    "step_time_s": step_time,
                    "peak_mem_gb": peak_memory_gb(),
                    "tokens_seen": progress.tokens_seen,
                }
                if indexer_loss is not None:
                    rec["indexer_loss"] = indexer_loss
                util = mfu(flops_per_token, tps, rt.dims.world)
                if util is not None:
                    rec["mfu"] = util
                if moe_loads:
                    rec["moe_load_max_over_mean"] = moe_loads
                if eval_loss is not None:
                    rec["eval_loss"] = eval_loss
                    rec["eval_mtp_losses"] = eval_mtp
                if due:
                    logger.log(rec)
                    window_time, window_steps = 0.0, 0
                else:
                    logger.print(format_line(rec, t.steps) + f" | then every {t.log_interval} steps")

            interval_due = spec.checkpoint.interval and step % spec.checkpoint.interval == 0
            exit_due = t.exit_interval and step - start_iteration >= t.exit_interval
            if interval_due or step == t.steps or exit_due or stop_now:
                if last_saved != step:
                    save("signal" if stop_now else "exit_interval" if exit_due else "interval" if interval_due
                         else "end of training")
                    last_saved = step
            if stop_now:
                stopped = "by signal"
                break
            if exit_due and step < t.steps:
                stopped = f"by exit_interval = {t.exit_interval}"
                break
    finally:
        feeder.close()
        stop.restore()
        if logger:
            logger.close()
    if progress.iteration > start_iteration:
        for line in summary_lines(spec, shown(run_dir), steps_run=progress.iteration - start_iteration,
                                  step=progress.iteration, tokens_seen=progress.tokens_seen,
                                  seconds=time.perf_counter() - started, last_loss=last_loss, last_eval=last_eval,
                                  stopped=stopped):
            say(line)
    return 0


def _flops_per_token(spec) -> Optional[float]:
    if device.on_cpu():
        return None
    try:
        from dsv4cli.spec.estimate import flops_per_token

        return float(flops_per_token(spec))
    except Exception:
        return None
