"""Damaged checkpoints (a data file cut short or gone, garbage `.metadata`): every command that reads a
checkpoint checks it first and exits 2 with one line naming the file, no traceback, nothing written.

The checkpoint is made once per module by a 2-step in-process `dsv4 train` (iter_0000001, iter_0000002);
each test damages its own copy. Also: long key-problem lists are summarised.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
DAMAGES = ("truncated", "missing", "garbage-metadata")


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root, dotfiles included."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def damage(iter_dir: Path, how: str) -> str:
    """Damage one checkpoint directory; -> the file name the error must name."""
    if how == "garbage-metadata":
        (iter_dir / ".metadata").write_bytes(b"\x80\x04garbage, not a pickle")
        return ".metadata"
    data = max(iter_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if how == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    return data.name


def one_error_line(res, name: str) -> str:
    """The command failed cleanly: exit 2, nothing on stdout, one stderr line naming `name`, no traceback."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.stdout == "", res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert name in lines[0] and lines[0].startswith("error: ") and "Traceback" not in res.stderr, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(spec path, run dir) of a 2-step run that saved after each step."""
    from conftest import make_tiny_spec

    from dsv4cli.spec.load import spec_to_toml
    from dsv4cli.train.entry import run

    base = tmp_path_factory.mktemp("trained")
    spec = make_tiny_spec(**{"train.global_batch_size": 4, "train.steps": 2, "train.warmup_steps": 1,
                             "train.eval_interval": 0, "train.eval_batches": 1, "checkpoint.interval": 1})
    path = base / "spec.toml"
    path.write_text(spec_to_toml(spec))
    run_dir = base / "run"
    assert run(str(path), [f'checkpoint.dir="{run_dir}"']) == 0
    assert (run_dir / "iter_0000001").is_dir() and (run_dir / "iter_0000002").is_dir()
    return path, run_dir


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained run: (spec path, run dir)."""
    spec, run_dir = trained
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return spec, dst


@pytest.fixture
def no_torchrun(monkeypatch):
    started = []
    monkeypatch.setattr("dsv4cli.train.launch.run_torchrun", lambda argv: started.append(list(argv)) or 0)
    return started


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


@pytest.mark.parametrize("how", DAMAGES)
def test_eval_of_a_damaged_checkpoint_is_exit_2_before_anything_runs(copy, how, no_torchrun, monkeypatch):
    spec, run_dir = copy
    name = damage(run_dir / "iter_0000002", how)
    before = tree(run_dir)
    built = []
    monkeypatch.setattr("dsv4cli.train.runtime.build_runtime", lambda *a, **k: built.append(1))
    for load in (run_dir, run_dir / "iter_0000002"):
        for extra in ([], ["--json"], ["--nproc-per-node", "2"], ["--nproc-per-node", "2", "--json"]):
            one_error_line(invoke("eval", str(spec), "--load", str(load), *extra), name)
    assert no_torchrun == [] and built == []
    assert tree(run_dir) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_from_a_damaged_latest_is_exit_2_and_names_the_earlier_checkpoint(copy, how, no_torchrun):
    spec, run_dir = copy
    name = damage(run_dir / "iter_0000002", how)
    before = tree(run_dir)
    earlier = run_dir / "iter_0000001"
    for extra in ([], ["--nproc-per-node", "2"]):
        line = one_error_line(invoke("train", str(spec), "--set", f"checkpoint.dir={run_dir}", "--set",
                                     "train.steps=3", *extra), name)
        assert f"--set checkpoint.load={earlier}" in line, line
    # the same for an explicit checkpoint.load naming the damaged iteration
    line = one_error_line(invoke("train", str(spec), "--set", f"checkpoint.dir={run_dir}", "--set",
                                 f"checkpoint.load={run_dir / 'iter_0000002'}"), name)
    assert f"--set checkpoint.load={earlier}" in line
    assert no_torchrun == []
    assert tree(run_dir) == before, "a refused run wrote into the run directory"


def test_the_rank_entry_point_checks_too(copy, capsys, monkeypatch):
    """`python -m dsv4cli.train.entry` (what torchrun runs) refuses a damaged checkpoint before building anything."""
    from dsv4cli.train.entry import run

    spec, run_dir = copy
    name = damage(run_dir / "iter_0000002", "truncated")
    built = []
    monkeypatch.setattr("dsv4cli.train.runtime.build_runtime", lambda *a, **k: built.append(1))
    assert run(str(spec), [f"checkpoint.dir={run_dir}"]) == 2
    assert run(str(spec), [], mode="eval", load=str(run_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(name in line for line in err) and built == []
    assert f"--set checkpoint.load={run_dir / 'iter_0000001'}" in err[0]


def test_resume_with_no_complete_checkpoint_left_says_so(copy):
    spec, run_dir = copy
    damage(run_dir / "iter_0000001", "missing")
    name = damage(run_dir / "iter_0000002", "truncated")
    line = one_error_line(invoke("train", str(spec), "--set", f"checkpoint.dir={run_dir}"), name)
    assert "no earlier complete checkpoint" in line


def test_the_suggested_resume_works(copy):
    """Following the advice (checkpoint.load = the earlier complete checkpoint) resumes and trains on."""
    spec, run_dir = copy
    damage(run_dir / "iter_0000002", "truncated")
    earlier = run_dir / "iter_0000001"
    res = invoke("train", str(spec), "--set", f"checkpoint.dir={run_dir}", "--set", f"checkpoint.load={earlier}")
    assert res.exit_code == 0, res.output
    assert f"resumed from {earlier} at step 1" in res.output
    from dsv4cli.ckpt.integrity import check_integrity

    check_integrity(run_dir / "iter_0000002", loading=True)  # re-saved whole


@pytest.mark.parametrize("how", DAMAGES)
def test_inspect_diff_and_convert_of_a_damaged_checkpoint_are_exit_2(copy, how, tmp_path):
    _, run_dir = copy
    good = tmp_path / "good"
    shutil.copytree(run_dir, good)
    name = damage(run_dir / "iter_0000002", how)
    before = tree(run_dir)
    for args in (["inspect", "checkpoint", str(run_dir)], ["inspect", "checkpoint", str(run_dir / "iter_0000002")],
                 ["inspect", "checkpoint", str(run_dir), "--json"], ["inspect", "checkpoint", str(run_dir), "--stats"],
                 ["inspect", "diff", str(good), str(run_dir)], ["inspect", "diff", str(run_dir), str(good), "--json"]):
        line = one_error_line(invoke(*args), name)
        assert "convert-ckpt" not in line
    dst = tmp_path / "converted"
    for extra in ([], ["--json"], ["--force", "--drop-optimizer"]):
        one_error_line(invoke("convert-ckpt", str(run_dir), str(dst), *extra), name)
        assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert tree(run_dir) == before
    assert invoke("inspect", "checkpoint", str(run_dir / "iter_0000001")).exit_code == 0  # the intact one still reads


def test_damaged_common_state_stops_eval_and_resume(copy, no_torchrun):
    """Megatron's common.pt is read by every load: eval and resume check it too (inspect does not read it)."""
    spec, run_dir = copy
    common = run_dir / "iter_0000002" / "common.pt"
    common.write_bytes(common.read_bytes()[:40])
    one_error_line(invoke("eval", str(spec), "--load", str(run_dir), "--json"), "common.pt")
    one_error_line(invoke("train", str(spec), "--set", f"checkpoint.dir={run_dir}"), "common.pt")
    assert invoke("inspect", "checkpoint", str(run_dir), "--json").exit_code == 0


def test_real_cli_process_prints_one_line_and_no_traceback(copy):
    """The same through the installed entry point: stderr holds exactly one line."""
    import os
    import subprocess
    import sys

    spec, run_dir = copy
    name = damage(run_dir / "iter_0000002", "truncated")
    env = dict(os.environ, **ENV, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "dsv4cli.cli", "eval", str(spec), "--load", str(run_dir), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert name in line and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- summaries


def test_summary_counts_per_category_lists_the_first_few_and_says_how_to_see_all():
    from dsv4cli.ckpt.summary import FIRST, KeyProblem, summarize

    problems = ([KeyProblem.of("unexpected", f"chained_0.optimizer.state.exp_avg.decoder.w{i}", "[128]")
                 for i in range(170)]
                + [KeyProblem.of("unexpected", f"optimizer.state.exp_avg_sq.decoder.w{i}", "[128]") for i in range(6)]
                + [KeyProblem.of("missing", f"decoder.layers.{i}.weight", "[32]") for i in range(3)]
                + [KeyProblem.of("mis-shaped", "embedding.word_embeddings.weight", "checkpoint [256, 32], model [256, 64]"),
                   KeyProblem.of("unexpected", "decoder.extra.weight", "[1]")])
    line = summarize(problems)
    assert "\n" not in line
    assert line.startswith("181 problems: 3 missing (3 model), 177 unexpected (1 model, 176 optimizer), "
                           "1 mis-shaped (1 model); "), line
    listed = sorted((p.text for p in problems if p.text + ";" in line), key=line.index)
    # the first few: missing first, then unexpected model keys before optimizer state
    assert listed[:4] == ["missing: decoder.layers.0.weight [32]", "missing: decoder.layers.1.weight [32]",
                          "missing: decoder.layers.2.weight [32]", "unexpected: decoder.extra.weight [1]"]
    assert len(listed) == FIRST
    assert f"; {len(problems) - FIRST} more (see all with --verbose)" in line
    full = summarize(problems, verbose=True)
    assert all(p.text in full for p in problems) and "more (see all" not in full
    short = summarize(problems[-2:])
    assert short == ("2 problems: 1 unexpected (1 model), 1 mis-shaped (1 model); unexpected: decoder.extra.weight [1]; "
                     "mis-shaped: embedding.word_embeddings.weight checkpoint [256, 32], model [256, 64]")


def test_eval_preflight_summarises_a_long_mismatch(tmp_path, tiny_spec, no_torchrun):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint
    from dsv4cli.spec.load import spec_to_toml

    spec = tiny_spec(**{"train.global_batch_size": 4})
    path = tmp_path / "spec.toml"
    path.write_text(spec_to_toml(spec))
    ckpt = tmp_path / "wide"
    write_synthetic_checkpoint(ckpt, tiny_spec(**{"model.hidden_size": 64, "model.num_attention_heads": 4}))
    for extra in ([], ["--nproc-per-node", "2"]):
        res = invoke("eval", str(path), "--load", str(ckpt), *extra)
        assert res.exit_code == 2 and res.stdout == "", res.output
        (line,) = res.stderr.strip().splitlines()
        n = int(line.split("do not match the spec: ", 1)[1].split(" problems", 1)[0])
        assert n > 10 and f"{n} mis-shaped ({n} model)" in line, line
        assert line.count("mis-shaped: ") == 5 and f"{n - 5} more (see all with --verbose)" in line
    assert no_torchrun == []
    from dsv4cli.train.launch import preflight_eval

    full = preflight_eval(spec, str(ckpt), verbose=True)
    assert full.count("mis-shaped: ") == n and "more (see all" not in full


def test_in_process_eval_of_a_legacy_checkpoint_names_convert_ckpt(tmp_path, tiny_spec, monkeypatch):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint
    from dsv4cli.spec.load import spec_to_toml

    spec = tiny_spec(**{"train.global_batch_size": 4})  # learned contraction: hc_head_* expected
    path = tmp_path / "spec.toml"
    path.write_text(spec_to_toml(spec))
    legacy = tmp_path / "legacy"
    write_synthetic_checkpoint(legacy, tiny_spec(**{"model.contraction.mode": "average"}),
                               omit=("hc_head_fn", "hc_head_base", "hc_head_scale"))
    built = []
    monkeypatch.setattr("dsv4cli.train.runtime.build_runtime", lambda *a, **k: built.append(1))
    for extra in ([], ["--json"]):
        res = invoke("eval", str(path), "--load", str(legacy), *extra)
        assert res.exit_code == 2 and res.stdout == "", res.output
        (line,) = res.stderr.strip().splitlines()
        assert "6 missing (6 model)" in line and f"dsv4 convert-ckpt {legacy} {legacy}-learned" in line, line
    assert built == []


def test_load_time_tensor_check_summarises_and_points_legacy_to_convert(tmp_path, tiny_spec):
    """The check the ranks run against the built model (train resume, eval) uses the same summary."""
    from dsv4cli.ckpt.synthetic import stacked_inventory, write_synthetic_checkpoint
    from dsv4cli.ckpt.conformance import check_tensors
    from dsv4cli.ckpt.errors import CheckpointError

    spec = tiny_spec()
    legacy = tmp_path / "legacy"
    it = write_synthetic_checkpoint(legacy, spec, omit=("hc_head_fn", "hc_head_base", "hc_head_scale"))
    with pytest.raises(CheckpointError) as e:
        check_tensors(it, stacked_inventory(spec))
    msg = str(e.value)
    assert "6 problems: 6 missing (6 model)" in msg and f"dsv4 convert-ckpt {legacy} {legacy}-learned" in msg
    assert "optimizer" not in msg  # stored optimizer state is not compared with the model

    wide = stacked_inventory(tiny_spec(**{"model.hidden_size": 64, "model.num_attention_heads": 4}))
    full = tmp_path / "full"
    it = write_synthetic_checkpoint(full, spec)
    with pytest.raises(CheckpointError) as e:
        check_tensors(it, wide)
    msg = str(e.value)
    assert "\n" not in msg and "more (see all with --verbose)" in msg and "convert-ckpt" not in msg
    assert msg.count("mis-shaped: ") == 5
    check_tensors(it, stacked_inventory(spec))  # matching: no error
