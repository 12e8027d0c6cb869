"""The sweep's comparison: one row per variant, read from its run directory, as a table, JSON or curves.

A row holds the varied values, the parameter counts of the variant's spec (total / active per
token, from the spec estimates), the final and best held-out loss and the final held-out MTP
losses (the records of metrics.jsonl that carry `eval_loss`; a resumed run's later record of a
step wins), the median tokens/s of the logged windows, and the wall time the sweep spent
training the variant (sweep.json, summed over re-runs). The best row has the lowest final
held-out loss. `dry_run_rows` gives the estimates of not yet trained variants instead.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from dsv4cli.sweep.grid import axis_names
from dsv4cli.sweep.run import SweepPlan, is_finished, read_record, steps_done

CURVES = "curves.png"


def _eval_records(run_dir: Path) -> tuple[list[dict], list[float]]:
    """metrics.jsonl -> (records with a held-out loss, in step order; tokens/s of every record)."""
    from dsv4cli.train.metrics import read_metrics

    by_step = {r["step"]: r for r in read_metrics(run_dir) if "step" in r}
    records = [by_step[s] for s in sorted(by_step)]
    evals = [r for r in records if r.get("eval_loss") is not None]
    return evals, [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]


def _status(plan) -> str:
    done = steps_done(plan)
    if is_finished(plan):
        return "finished"
    return "not run" if done is None else f"step {done}/{plan.spec.train.steps}"


def summary_rows(sweep: SweepPlan) -> list[dict]:
    """One JSON-ready dict per variant (see the module docstring); `best` marks the lowest final held-out loss."""
    from dsv4cli.spec.estimate import param_counts

    rows = []
    for v, plan in sweep:
        counts = param_counts(plan.spec)
        evals, speeds = _eval_records(v.run_dir)
        rows.append({
            "slug": v.slug,
            "set": v.values,
            "run_dir": str(v.run_dir),
            "status": _status(plan),
            "params": {"total": counts.total, "active": counts.active},
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "final_eval_step": evals[-1]["step"] if evals else None,
            "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
            "final_mtp_losses": (evals[-1].get("eval_mtp_losses") or []) if evals else [],
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "wall_s": read_record(v.run_dir).get("wall_s"),
        })
    _mark_best(rows, "final_eval_loss")
    return rows


def dry_run_rows(sweep: SweepPlan) -> list[dict]:
    """One dict per variant with its estimates: parameters, memory per rank, FLOPs per token, torchrun argv."""
    from dsv4cli.spec.estimate import estimate

    rows = []
    for v, plan in sweep:
        est = estimate(plan.spec, plan.world_size)
        rows.append({
            "slug": v.slug,
            "set": v.values,
            "run_dir": str(v.run_dir),
            "status": _status(plan),
            "params": {"total": est.params.total, "active": est.params.active},
            "memory_per_rank": est.memory.total,
            "flops_per_token": est.flops_per_token,
            "world_size": plan.world_size,
            "torchrun": plan.argv,
        })
    return rows


def _mark_best(rows: list[dict], key: str) -> None:
    scored = [r for r in rows if r[key] is not None]
    best = min(scored, key=lambda r: r[key]) if scored else None
    for r in rows:
        r["best"] = r is best


def to_json(rows: list[dict]) -> str:
    return json.dumps({"variants": rows})


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _loss(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def _wall(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{seconds:.1f}s"


def summary_table(sweep: SweepPlan, rows: list[dict]):
    """rows -> rich Table (the best row marked with *)."""
    from rich.table import Table

    table = Table(title=f"Sweep {sweep.out_dir} ({len(rows)} variants; * = lowest final held-out loss)",
                  title_justify="left")
    table.add_column("")
    for name in axis_names(sweep.axes):
        table.add_column(name)
    for name in ("status", "params", "active", "final eval", "best eval", "final MTP", "tok/s", "wall"):
        table.add_column(name, justify="left" if name == "status" else "right")
    for r in rows:
        mtp = ", ".join(_loss(x) for x in r["final_mtp_losses"]) or "-"
        speed = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        table.add_row("*" if r["best"] else "", *(_value(r["set"][a.key]) for a in sweep.axes), r["status"],
                      f"{r['params']['total']:,}", f"{r['params']['active']:,}", _loss(r["final_eval_loss"]),
                      _loss(r["best_eval_loss"]), mtp, speed, _wall(r["wall_s"]))
    return table


def dry_run_table(sweep: SweepPlan, rows: list[dict]):
    """Estimates of every variant -> rich Table."""
    from rich.table import Table

    table = Table(title=f"Sweep {sweep.out_dir}: {len(rows)} variants (estimates; nothing runs)", title_justify="left")
    for name in axis_names(sweep.axes):
        table.add_column(name)
    for name in ("status", "params", "active", "mem/rank", "FLOPs/token", "world"):
        table.add_column(name, justify="left" if name == "status" else "right")
    for r in rows:
        table.add_row(*(_value(r["set"][a.key]) for a in sweep.axes), r["status"], f"{r['params']['total']:,}",
                      f"{r['params']['active']:,}", f"{r['memory_per_rank'] / 2**30:.2f} GiB",
                      f"{r['flops_per_token']:,}", str(r["world_size"]))
    return table


def plot_sweep(sweep: SweepPlan, rows: list[dict]) -> Optional[Path]:
    """DIR/curves.png with the loss curves of every variant that has metrics (as `dsv4 plot`); None if none has.
    Raises PlotError (e.g. matplotlib missing)."""
    from dsv4cli.train.metrics import read_metrics
    from dsv4cli.train.plot import plot_runs

    dirs = [r["run_dir"] for r in rows if read_metrics(r["run_dir"])]
    return plot_runs(dirs, str(sweep.out_dir / CURVES)) if dirs else None
