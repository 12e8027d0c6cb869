"""metrics.jsonl fields (docs/design.md §2.6), plain progress lines, and `dsv4 plot`."""

from __future__ import annotations

import json
import sys

from test_train_e2e import cli

from dsv4cli.train.metrics import METRIC_FIELDS, MetricsLogger, format_line, read_metrics


def _rec(step, loss, eval_loss=None):
    r = {"step": step, "loss": loss, "mtp_losses": [loss + 0.1], "grad_norm": 1.5, "lr": 3e-4,
         "tokens_per_s": 1234.0, "step_time_s": 0.25, "peak_mem_gb": 0.5}
    if eval_loss is not None:
        r["eval_loss"] = eval_loss
    return r


def test_metrics_jsonl_has_the_design_fields(tmp_path, capsys):
    log = MetricsLogger(tmp_path, total_steps=20, tty=False)
    log.log(_rec(10, 3.5))
    log.log(_rec(20, 2.5, eval_loss=2.75))
    log.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [10, 20]
    for r in recs:
        for field in METRIC_FIELDS:
            assert field in r, field
    assert recs[1]["eval_loss"] == 2.75 and "eval_loss" not in recs[0]
    assert recs[0]["mtp_losses"] == [3.6]
    out = capsys.readouterr().out
    assert "step 10/20 | loss 3.5000 | mtp 3.6000" in out and "eval_loss 2.7500" in out
    assert "\x1b[" not in out, "plain lines without a TTY"


def test_metrics_file_is_appended_on_resume(tmp_path):
    for step in (1, 2):
        log = MetricsLogger(tmp_path, total_steps=2, tty=False)
        log.log(_rec(step, 1.0))
        log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_non_finite_values_are_written_as_null(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=1, tty=False)
    log.log(_rec(1, float("nan")))
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line)["loss"] is None


def test_format_line_shows_mfu_when_known():
    assert "MFU 41.0%" in format_line({**_rec(1, 2.0), "mfu": 0.41}, 5)
    assert "MFU" not in format_line(_rec(1, 2.0), 5)


def _run_dir(tmp_path, name, losses):
    d = tmp_path / name
    log = MetricsLogger(d, total_steps=len(losses), tty=False)
    for i, x in enumerate(losses, 1):
        log.log(_rec(i, x, eval_loss=x + 0.2 if i % 2 == 0 else None))
    log.close()
    return d


def test_plot_curves_and_missing_matplotlib_message(tmp_path, monkeypatch):
    from dsv4cli.train.plot import curves

    a = _run_dir(tmp_path, "n1", [3.0, 2.5, 2.0, 1.8])
    b = _run_dir(tmp_path, "n4", [3.0, 2.4, 1.9, 1.7])
    c = curves(a)
    assert c["step"] == [1, 2, 3, 4] and c["loss"] == [3.0, 2.5, 2.0, 1.8]
    assert c["eval_step"] == [2, 4] and c["mtp"] == [[x + 0.1 for x in (3.0, 2.5, 2.0, 1.8)]]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = cli("plot", str(a), str(b), "-o", str(tmp_path / "curves.png"))
    assert r.exit_code == 2 and "matplotlib" in r.stderr and "pip install" in r.stderr
    assert not (tmp_path / "curves.png").exists()


def test_plot_writes_an_image_when_matplotlib_is_installed(tmp_path):
    a = _run_dir(tmp_path, "n1", [3.0, 2.5, 2.0, 1.8])
    r = cli("plot", str(a), "-o", str(tmp_path / "c.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.exit_code == 2 and "matplotlib" in r.stderr
        return
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_rejects_a_directory_without_metrics(tmp_path):
    r = cli("plot", str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2


def test_plot_defaults_into_the_run_dir_and_draws_a_one_point_run(tmp_path, monkeypatch):
    import matplotlib  # the set-up installs the [plot] extra

    from dsv4cli.train.plot import figure

    a = _run_dir(tmp_path, "n1", [3.0, 2.5])
    one = _run_dir(tmp_path, "one", [3.0])
    monkeypatch.chdir(tmp_path)
    r = cli("plot", str(a), str(one))
    assert r.exit_code == 0, r.output
    assert (a / "curves.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "curves.png").exists()
    fig = figure([str(a), str(one)])
    lone = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("one")]
    assert lone and all(ln.get_marker() == "o" and len(ln.get_xdata()) == 1 for ln in lone)
    assert all(ln.get_marker() in (None, "None", "") for ln in fig.axes[0].lines if ln.get_label().startswith("n1"))
    matplotlib.pyplot.close(fig)
