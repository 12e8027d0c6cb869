"""`dsv4 sweep`: variants from --vary, validation before training, dry-run, sbatch, and (slow) a
2 x 2 sweep of the tiny spec against the same variants trained one by one, re-runs and Ctrl-C."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_e2e import REPO, _env, cli, metrics, signal_when

from dsv4cli.spec.estimate import param_counts
from dsv4cli.sweep.grid import SweepError, parse_axes, split_values, variants
from dsv4cli.train.launch import launch_overrides, plan_launch, slurm_script

TINY = str(REPO / "specs" / "tiny.toml")
# The tiny spec, cut to a few seconds per variant: 4 steps of 2 sequences of 32 tokens, held-out loss at 2 and 4.
SHORT = ["train.steps=4", "train.warmup_steps=1", "train.eval_interval=2", "train.eval_batches=1",
         "train.log_interval=1", "train.micro_batch_size=2", "train.global_batch_size=2", "model.seq_length=32"]
VARY = ["model.mhc.streams=1,2", "model.mtp.depth=1,2"]
SLUGS = ["streams-1_depth-1", "streams-1_depth-2", "streams-2_depth-1", "streams-2_depth-2"]


def sweep_args(out: Path, *extra: str, vary=VARY) -> list[str]:
    args = ["sweep", TINY, "--out", str(out)]
    for item in vary:
        args += ["--vary", item]
    for item in SHORT:
        args += ["--set", item]
    return args + list(extra)


def no_training(monkeypatch):
    """Make any training attempt fail the test."""
    import dsv4cli.train.entry

    def refuse(*a, **k):
        raise AssertionError("a variant was trained")

    monkeypatch.setattr(dsv4cli.train.entry, "run", refuse)
    monkeypatch.setattr("dsv4cli.train.launch.run_torchrun", refuse)


# --------------------------------------------------------------------------- fast: the grid


def test_vary_values_split_like_toml_with_commas_inside_brackets_and_quotes_kept():
    assert split_values('1, 2,[3, 4],"a,b",learned') == ["1", "2", "[3, 4]", '"a,b"', "learned"]
    (streams, mode, paths) = parse_axes(["model.mhc.streams=1,2,4", "model.contraction.mode=learned,\"average\"",
                                         'data.paths=["a","b"],["c"]'])
    assert streams.values == (1, 2, 4) and mode.values == ("learned", "average")
    assert paths.values == (["a", "b"], ["c"])


def test_product_and_zip_give_the_variants_in_order_with_readable_unique_slugs(tmp_path):
    axes = parse_axes(["model.mhc.streams=1,2", "model.mtp.depth=0,1,2"])
    product = variants(axes, tmp_path)
    assert [v.values for v in product][:2] == [{"model.mhc.streams": 1, "model.mtp.depth": 0},
                                              {"model.mhc.streams": 1, "model.mtp.depth": 1}]
    assert len(product) == 6 and len({v.slug for v in product}) == 6
    assert product[5].slug == "streams-2_depth-2" and product[5].run_dir == tmp_path.resolve() / product[5].slug
    assert product[5].overrides(["train.steps=3"]) == [
        "train.steps=3", "model.mhc.streams=2", "model.mtp.depth=2", f'checkpoint.dir="{tmp_path.resolve()}/streams-2_depth-2"']
    zipped = variants(parse_axes(["model.mhc.streams=1,2", "model.mtp.depth=0,1"], zip_=True), tmp_path, zip_=True)
    assert [v.slug for v in zipped] == ["streams-1_depth-0", "streams-2_depth-1"]
    # same last key part in two axes -> the whole dotted key names them
    clash = variants(parse_axes(["model.mtp.depth=1", "other.depth=2"]), tmp_path)
    assert clash[0].slug == "model.mtp.depth-1_other.depth-2"


@pytest.mark.parametrize("args, message", [
    (["--vary", "model.mhc.streams=1,2", "--vary", "model.mtp.depth=0,1,2", "--zip"], "--zip needs lists of equal length"),
    (["--vary", "model.mhc.streams=1,1"], "given twice"),
    (["--vary", "model.mhc.streams=1,,2"], "empty value"),
    (["--vary", "model.mhc.streams=1", "--vary", "model.mhc.streams=2"], "more than once"),
    (["--vary", "checkpoint.dir=a,b"], "set by the sweep"),
    ([], "nothing to vary"),
])
def test_bad_vary_arguments_exit_2_with_one_line(tmp_path, args, message):
    r = cli("sweep", TINY, "--out", str(tmp_path / "s"), *args)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s").exists()


def test_an_invalid_value_in_one_variant_stops_the_sweep_before_any_training(tmp_path, monkeypatch):
    no_training(monkeypatch)
    out = tmp_path / "s"
    r = cli("sweep", TINY, "--out", str(out), "--vary", "model.mhc.streams=2,0", "--vary", "model.mtp.depth=1,9",
            "--set", "train.steps=4")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    # every bad variant and key at once; the valid variant streams-2_depth-1 is not named
    for slug, key in (("streams-0_depth-1", "model.mhc.streams"), ("streams-2_depth-9", "model.mtp.depth"),
                      ("streams-0_depth-9", "model.mhc.streams"), ("streams-0_depth-9", "model.mtp.depth")):
        assert any(ln.startswith(f"variant {slug}: ") and key in ln for ln in lines), (slug, key, lines)
    assert not any("streams-2_depth-1" in ln for ln in lines)
    assert not out.exists()


def test_dry_run_prints_each_variants_estimates_and_writes_nothing(tmp_path, monkeypatch):
    no_training(monkeypatch)
    out = tmp_path / "s"
    r = cli(*sweep_args(out, "--dry-run", "--json"))
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["variants"]
    assert [row["slug"] for row in rows] == SLUGS
    for row in rows:
        spec = plan_launch(TINY, [*SHORT, *(f"{k}={v}" for k, v in row["set"].items())]).spec
        assert row["params"]["total"] == param_counts(spec).total
        assert row["memory_per_rank"] > 0 and row["flops_per_token"] > 0 and row["status"] == "not run"
    assert rows[0]["params"]["total"] < rows[2]["params"]["total"], "2 streams add mHC parameters"
    text = cli(*sweep_args(out, "--dry-run"))
    assert text.exit_code == 0 and "streams-2_depth-2" in text.stdout and "FLOPs/token" in text.stdout
    assert not out.exists()


def test_slurm_writes_one_sbatch_per_variant_running_the_train_torchrun_command(tmp_path, monkeypatch):
    no_training(monkeypatch)
    out, jobs = tmp_path / "s", tmp_path / "jobs"
    r = cli(*sweep_args(out, "--slurm", str(jobs), "--nproc-per-node", "2", "--set", "train.global_batch_size=4"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in jobs.iterdir()) == [f"{s}.sbatch" for s in SLUGS]
    for slug in SLUGS:
        variant = next(v for v in variants(parse_axes(VARY), out) if v.slug == slug)
        plan = plan_launch(TINY, variant.overrides([*SHORT, "train.global_batch_size=4", *launch_overrides(2)]))
        text = (jobs / f"{slug}.sbatch").read_text()
        assert text == slurm_script(plan), slug  # what `dsv4 train --slurm` writes for that variant
        launch = shlex.split(next(ln for ln in text.splitlines() if ln.startswith("LAUNCH=")).partition("=")[2])[0]
        assert f"checkpoint.dir=\"{out.resolve() / slug}\"" in launch and "--nproc-per-node 2" in launch
        assert (out / slug / "spec.toml").is_file() and not (out / slug / "metrics.jsonl").exists()


def test_a_sweep_error_lists_problems_as_lines():
    with pytest.raises(SweepError) as e:
        parse_axes(["model.mhc.streams"], zip_=False)
    assert e.value.problems == ["error: --vary 'model.mhc.streams': expected KEY=V1,V2,..."]


# --------------------------------------------------------------------------- slow: training


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 2 x 2 sweep (streams 1, 2 x MTP depth 1, 2) of the short tiny spec, run once: (out dir, result)."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    r = cli(*sweep_args(out, "--json"))
    assert r.exit_code == 0, r.output
    return out, r


@pytest.mark.slow
def test_2x2_sweep_equals_the_four_variants_trained_one_by_one(swept, tmp_path):
    out, r = swept
    rows = json.loads(r.stdout)["variants"]  # stdout holds only the JSON; training progress went to stderr
    assert [row["slug"] for row in rows] == SLUGS and "step 4/4" in r.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == SLUGS
    assert (out / "curves.png").stat().st_size > 1000
    assert sum(row["best"] for row in rows) == 1
    for row in rows:
        run = out / row["slug"]
        assert row["run_dir"] == str(run.resolve()) and row["status"] == "finished"
        assert (run / "spec.toml").is_file() and (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
        solo = tmp_path / row["slug"]
        items = [*SHORT, *(f"{k}={v}" for k, v in row["set"].items()), f"checkpoint.dir={solo}"]
        t = cli("train", TINY, *(a for item in items for a in ("--set", item)))
        assert t.exit_code == 0, t.output
        evals = [x for x in metrics(solo) if "eval_loss" in x]
        assert [x["step"] for x in evals] == [2, 4]
        assert row["final_eval_loss"] == evals[-1]["eval_loss"], row["slug"]
        assert row["best_eval_loss"] == min(x["eval_loss"] for x in evals)
        assert row["final_mtp_losses"] == evals[-1]["eval_mtp_losses"] and len(row["final_mtp_losses"]) == row["set"]["model.mtp.depth"]
    best = min(rows, key=lambda row: row["final_eval_loss"])
    assert best["best"]


@pytest.mark.slow
def test_rerunning_a_finished_sweep_trains_nothing_and_prints_the_same_summary(swept, monkeypatch):
    out, first = swept
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "curves.png"}
    no_training(monkeypatch)
    again = cli(*sweep_args(out, "--json"))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert again.stderr.count("skipped") == 4
    table = cli(*sweep_args(out))
    only = cli(*sweep_args(out, "--summary-only"))
    assert table.exit_code == only.exit_code == 0
    assert table.stdout == only.stdout and "streams-" not in table.stdout  # the table names values, not slugs
    assert table.stdout.count("finished") == 4 and table.stdout.count(" * ") + table.stdout.count("│ * ") >= 1
    # the same sweep with another model would resume checkpoints of a different model: exit 2 per variant
    changed = cli(*sweep_args(out, "--set", "model.ffn_hidden_size=256"))
    assert changed.exit_code == 2, changed.output
    for slug in SLUGS:
        assert f"variant {slug}: error: " in changed.stderr and "model.ffn_hidden_size: 352 -> 256" in changed.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_after_its_first_variant_completes_the_rest_on_rerun(swept, tmp_path):
    """Zipped: streams-1_depth-1 then streams-2_depth-2, SIGINT once the first is done; the re-run
    skips it, resumes the second, and both end where the uninterrupted 2 x 2 sweep ended."""
    out, first = swept
    reference = {row["slug"]: row for row in json.loads(first.stdout)["variants"]}
    mine = tmp_path / "s"
    args = sweep_args(mine, "--zip")
    log = tmp_path / "sweep.log"  # a file, not a pipe: an unread pipe that fills up would block the run
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "dsv4cli.cli", *args], cwd=str(REPO), env=_env(),
                                stdout=sink, stderr=subprocess.STDOUT)
        second = mine / "streams-2_depth-2" / "sweep.json"  # written as the second variant starts
        signal_when(proc, second.is_file, signal.SIGINT, poll=0.02)
    text = log.read_text()
    assert proc.returncode == 0 and "sweep stopped at streams-2_depth-2" in text, text[-3000:]
    assert not (mine / "streams-2_depth-2" / "latest_checkpointed_iteration.txt").is_file() or \
        int((mine / "streams-2_depth-2" / "latest_checkpointed_iteration.txt").read_text()) < 4
    again = cli(*args, "--json")
    assert again.exit_code == 0, again.output
    assert "[1/2] streams-1_depth-1: finished (step 4), skipped" in again.stderr
    rows = json.loads(again.stdout)["variants"]
    assert [row["slug"] for row in rows] == ["streams-1_depth-1", "streams-2_depth-2"]
    for row in rows:
        assert row["status"] == "finished"
        assert row["final_eval_loss"] == reference[row["slug"]]["final_eval_loss"], row["slug"]


@pytest.mark.slow
def test_a_variant_stopped_midway_resumes_from_its_checkpoint_on_rerun(swept, tmp_path):
    """exit_interval stops the first variant at step 2 (saved, exit 0): the sweep stops there; the
    re-run resumes it from step 2 and ends bit for bit where the uninterrupted sweep ended."""
    out, first = swept
    reference = {row["slug"]: row for row in json.loads(first.stdout)["variants"]}
    mine = tmp_path / "s"
    stopped = cli(*sweep_args(mine, "--zip", "--set", "train.exit_interval=2"))
    assert stopped.exit_code == 0, stopped.output
    assert "sweep stopped at streams-1_depth-1 step 2" in stopped.stderr
    assert "step 2/4" in stopped.stdout and not (mine / "streams-2_depth-2").exists()
    again = cli(*sweep_args(mine, "--zip", "--json"))
    assert again.exit_code == 0, again.output
    assert "[1/2] streams-1_depth-1: resuming from step 2" in again.stderr
    for row in json.loads(again.stdout)["variants"]:
        assert row["status"] == "finished"
        assert row["final_eval_loss"] == reference[row["slug"]]["final_eval_loss"], row["slug"]
        assert row["best_eval_loss"] == reference[row["slug"]]["best_eval_loss"], row["slug"]


def test_dry_run_and_help_do_not_import_torch(tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from dsv4cli.cli import app; "
            f"r = CliRunner().invoke(app, {sweep_args(tmp_path / 's', '--dry-run')!r}); "
            "h = CliRunner().invoke(app, ['sweep', '--help']); "
            "assert r.exit_code == 0 and h.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_failed_variant_does_not_stop_the_others_and_an_unfinished_one_stops_the_sweep(tmp_path):
    """run_sweep with a stand-in for training: variant 2 fails (exit 1), the rest finish -> exit 1;
    then a variant that returns 0 without reaching train.steps (a signal) stops the sweep there."""
    from dsv4cli.sweep.run import plan_sweep, run_sweep

    sweep = plan_sweep(TINY, VARY, SHORT, out_dir=str(tmp_path / "s"))
    trained = []

    def fake(plan, reach=4, fail_on="streams-1_depth-2"):
        run = Path(plan.spec.checkpoint.dir)
        trained.append(run.name)
        if run.name == fail_on:
            return 1
        (run / "latest_checkpointed_iteration.txt").write_text(str(reach))
        return 0

    said = []
    outcome = run_sweep(sweep, said.append, train=fake)
    assert trained == SLUGS and outcome.failed == {"streams-1_depth-2": 1} and outcome.exit_code == 1
    assert outcome.stopped_at is None and any("failed (exit 1)" in line for line in said)
    assert all((tmp_path / "s" / slug / "spec.toml").is_file() for slug in SLUGS)
    trained.clear()
    outcome = run_sweep(sweep, said.append, train=lambda plan: fake(plan, reach=2, fail_on=None))
    assert trained == ["streams-1_depth-2"] and outcome.stopped_at == "streams-1_depth-2" and outcome.exit_code == 0
    assert said[-1] == "sweep stopped at streams-1_depth-2 step 2; run the same command again to resume"
