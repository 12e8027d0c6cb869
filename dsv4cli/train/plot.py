"""`dsv4 plot`: loss curves of one or more run directories (their metrics.jsonl) into one image.

Left panel: training loss (and MTP depth losses, dashed); right panel: held-out loss. One colour
per run, labelled with the run directory's name, so variants sit side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class PlotError(ValueError):
    """Bad input for plotting (exit 2)."""


def curves(run_dir: str | Path) -> dict:
    """metrics.jsonl -> {"step": [...], "loss": [...], "mtp": [[...] per depth], "eval_step", "eval_loss"}.

    A resumed run appends to the file; the last record of a step wins.
    """
    from dsv4cli.train.metrics import read_metrics

    recs = read_metrics(run_dir)
    if not recs:
        raise PlotError(f"{run_dir}: no metrics.jsonl records (is it a dsv4 run directory?)")
    by_step = {}
    for r in recs:
        if "step" in r:
            by_step[r["step"]] = r
    steps = sorted(by_step)
    depth = max((len(by_step[s].get("mtp_losses") or []) for s in steps), default=0)
    out = {
        "step": steps,
        "loss": [by_step[s].get("loss") for s in steps],
        "mtp": [[(by_step[s].get("mtp_losses") or [None] * depth)[k] for s in steps] for k in range(depth)],
        "eval_step": [s for s in steps if by_step[s].get("eval_loss") is not None],
    }
    out["eval_loss"] = [by_step[s]["eval_loss"] for s in out["eval_step"]]
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("dsv4 plot needs matplotlib: pip install 'dsv4[plot]' (or pip install matplotlib)") from None
    return plt


def plot_runs(run_dirs: Sequence[str], output: str) -> Path:
    """Draw the curves of `run_dirs` into `output` (PNG/PDF/SVG by extension)."""
    plt = _pyplot()
    fig = figure(run_dirs)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}.tmp{out.suffix}"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


def figure(run_dirs: Sequence[str]):
    """The matplotlib figure of `run_dirs`: training and MTP losses left, held-out loss right."""
    plt = _pyplot()
    data = [(Path(d).name or str(d), curves(d)) for d in run_dirs]
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, c) in enumerate(data):
        color = f"C{i % 10}"
        marker = "o" if len(c["step"]) == 1 else None  # a line needs two points: draw a lone one as a dot
        ax_train.plot(c["step"], c["loss"], color=color, marker=marker, label=f"{name} loss")
        for k, mtp in enumerate(c["mtp"]):
            ax_train.plot(c["step"], mtp, color=color, marker=marker, linestyle="--", alpha=0.6,
                          label=f"{name} mtp {k + 1}")
        if c["eval_step"]:
            ax_eval.plot(c["eval_step"], c["eval_loss"], color=color, marker="o", label=name)
    ax_train.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    ax_eval.set(title="held-out loss", xlabel="step", ylabel="cross-entropy")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
