"""What `dsv4 train` prints when a run ends: a summary of the run and the commands to run next.

No torch import: the lines are built from the spec, the run's counters and its metrics.jsonl.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional


def shown(path: str | Path) -> Path:
    """`path` relative to the current directory when it lies below it (shorter commands to copy)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return p


def _duration(seconds: float) -> str:
    """61.2 -> '1 min 1 s'; 3725 -> '1 h 2 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)  # ints, strings (TOML basic strings), lists


def model_overrides(spec) -> list[str]:
    """The `--set model.*=...` overrides the spec was resolved with: a checkpoint of this run
    loads only into a spec with the same [model], so the next commands repeat them."""
    from dsv4cli.spec.problems import OVERRIDE_FILE
    from dsv4cli.spec.schema import dotted

    origins = getattr(spec, "_origins", None) or {}
    flat = dotted(spec.model_dump(mode="json", exclude={"extends"}))
    keys = [k for k, (file, _) in origins.items() if file == OVERRIDE_FILE and k.startswith("model.") and k in flat]
    return [f"{k}={_toml_value(flat[k])}" for k in sorted(keys)]


def _eval_command(spec, run_dir: Path) -> str:
    spec_file = getattr(spec, "_root", None) or "SPEC"
    argv = ["dsv4", "eval", spec_file, "--load", str(run_dir)]
    for o in model_overrides(spec):
        argv += ["--set", o]
    return shlex.join(argv)


def best_eval(run_dir: Path, up_to: int) -> Optional[tuple[int, float]]:
    """(step, held-out loss) of the lowest held-out loss in metrics.jsonl up to step `up_to`."""
    from dsv4cli.train.metrics import read_metrics

    by_step = {r["step"]: r["eval_loss"] for r in read_metrics(run_dir)
               if isinstance(r.get("step"), int) and r["step"] <= up_to and r.get("eval_loss") is not None}
    if not by_step:
        return None
    step = min(by_step, key=lambda s: by_step[s])
    return step, by_step[step]


def summary_lines(spec, run_dir: Path, *, steps_run: int, step: int, tokens_seen: int, seconds: float,
                  last_loss: Optional[float], last_eval: Optional[tuple[int, float]],
                  stopped: Optional[str] = None) -> list[str]:
    """The end-of-run block: steps, tokens, time, final and best held-out loss, files, next commands.

    `last_eval` is (step, loss) of the latest held-out evaluation of this run; `stopped` is why the
    run ended before train.steps (None when it reached them)."""
    total = spec.train.steps
    head = "training finished" if stopped is None else f"training stopped {stopped}"
    lines = [f"{head}: step {step}/{total} ({steps_run} steps in {_duration(seconds)}, "
             f"{tokens_seen:,} tokens seen in total)"]
    if last_loss is not None:
        lines.append(f"  training loss at step {step}: {last_loss:.4f}")
    best = best_eval(run_dir, step)
    if last_eval is not None:
        text = f"  held-out loss: {last_eval[1]:.4f} at step {last_eval[0]}"
        if best is not None and best[0] != last_eval[0]:
            text += f"; best {best[1]:.4f} at step {best[0]}"
        lines.append(text)
    elif best is not None:
        lines.append(f"  held-out loss: best {best[1]:.4f} at step {best[0]}")
    lines.append(f"  metrics: {run_dir / 'metrics.jsonl'}")
    lines.append("next:")
    if stopped is not None:
        lines.append("  resume with the same command")
    lines.append(f"  {_eval_command(spec, run_dir)}    # held-out loss of the latest checkpoint")
    lines.append(f"  {shlex.join(['dsv4', 'plot', str(run_dir)])}    # loss curves -> {run_dir / 'curves.png'}")
    lines.append(f"  {shlex.join(['dsv4', 'inspect', 'checkpoint', str(run_dir)])}    # what the checkpoint holds")
    return lines


def nothing_to_do(spec, run_dir: Path, step: int) -> str:
    """The message for a run whose checkpoint already reached train.steps."""
    more = max(2 * spec.train.steps, step + 1)
    return (f"nothing to do: the checkpoint in {run_dir} is at step {step} and train.steps is {spec.train.steps}. "
            f"To train further, raise it (--set train.steps={more}); to start over, use a new directory "
            f"(--set checkpoint.dir={run_dir}-2) or remove {run_dir}.")
