"""Training metrics: metrics.jsonl (docs/design.md §2.6), progress on the terminal, TensorBoard if installed.

Only rank 0 constructs a `MetricsLogger`. One JSON object per logged step:
`step`, `loss`, `mtp_losses`, `grad_norm`, `lr`, `tokens_per_s`, `step_time_s`, `peak_mem_gb`,
`mfu` (GPU only), `eval_loss` when a held-out evaluation ran at that step, and with DeepSeek-V4's
top-k routers `moe_load_max_over_mean`: per layer with an expert bias (layer order, MTP last) the
busiest expert's token count over the mean count in that step, summed over all ranks (1 = even).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Optional

from dsv4cli.compat import device

# Dense bf16 peak FLOP/s per device, for MFU (H100/H200 SXM, A100, B200).
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "GH200": 989e12}

METRIC_FIELDS = ("step", "loss", "mtp_losses", "grad_norm", "lr", "tokens_per_s", "step_time_s")


def peak_memory_gb() -> float:
    """Peak accelerator memory (CUDA) or peak resident set size of this process (CPU), in GiB."""
    import torch

    if device.cuda_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_flops() -> Optional[float]:
    import torch

    if device.on_cpu():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def mfu(flops_per_token: Optional[float], tokens_per_s: float, world_size: int) -> Optional[float]:
    peak = device_peak_flops()
    if peak is None or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def format_line(rec: dict, total_steps: int) -> str:
    """One plain progress line, e.g. 'step 10/200 | loss 4.1234 | mtp 4.3012 | ...'."""
    parts = [f"step {rec['step']}/{total_steps}", f"loss {_fmt(rec.get('loss'))}"]
    if rec.get("mtp_losses"):
        parts.append("mtp " + ",".join(_fmt(x) for x in rec["mtp_losses"]))
    if rec.get("indexer_loss") is not None:
        parts.append(f"idx {_fmt(rec['indexer_loss'])}")
    if rec.get("eval_loss") is not None:
        parts.append(f"eval_loss {_fmt(rec['eval_loss'])}")
    if rec.get("moe_load_max_over_mean"):
        parts.append(f"moe load max/mean {max(rec['moe_load_max_over_mean']):.2f}")
    parts += [
        f"grad_norm {_fmt(rec.get('grad_norm'))}",
        f"lr {rec.get('lr', 0):.3e}",
        f"{rec.get('tokens_per_s', 0):,.0f} tok/s",
        f"{rec.get('step_time_s', 0):.3f} s/step",
        f"mem {rec.get('peak_mem_gb', 0):.2f} GiB",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


class MetricsLogger:
    """Appends to RUN_DIR/metrics.jsonl and shows progress (rich bar on a TTY, plain lines otherwise)."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, tty: Optional[bool] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.total = total_steps
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._file = open(self.path, "a", buffering=1)
        self._tb = self._tensorboard()
        self._progress = None
        self._task = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        except Exception:
            return None

    def print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, rec: dict) -> None:
        """Write one record (must hold METRIC_FIELDS) and show it."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self._file.write(json.dumps(clean) + "\n")
        line = format_line(rec, self.total)
        if self._progress is not None:
            self._progress.update(self._task, completed=rec["step"], info=f"loss {_fmt(rec.get('loss'))}")
        self.print(line)
        if self._tb is not None:
            for k in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "eval_loss", "mfu"):
                if isinstance(rec.get(k), (int, float)):
                    self._tb.add_scalar(f"train/{k}", rec[k], rec["step"])
            for i, v in enumerate(rec.get("mtp_losses") or []):
                self._tb.add_scalar(f"train/mtp_{i + 1}_loss", v, rec["step"])
            for i, v in enumerate(rec.get("moe_load_max_over_mean") or []):
                self._tb.add_scalar(f"train/moe_load_max_over_mean_{i}", v, rec["step"])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of RUN_DIR/metrics.jsonl (a resumed run appends; later records win per step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs
