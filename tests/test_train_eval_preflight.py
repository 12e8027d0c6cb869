"""`dsv4 eval` under torchrun refuses a checkpoint whose tensors do not match the spec with exit 2,
in the launching process, before torchrun starts (a rank's exit 2 would surface as torchrun's 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def _write_spec(tmp_path: Path, **overrides) -> tuple[Path, object]:
    from conftest import make_tiny_spec

    from dsv4cli.spec.load import spec_to_toml

    spec = make_tiny_spec(**{"train.global_batch_size": 4, **overrides})
    path = tmp_path / "spec.toml"
    path.write_text(spec_to_toml(spec))
    return path, spec


@pytest.fixture
def no_torchrun(monkeypatch):
    started = []

    def fake_run_torchrun(argv, *args, **kwargs):
        started.append(list(argv))
        return 0

    monkeypatch.setattr("dsv4cli.train.launch.run_torchrun", fake_run_torchrun)
    return started


def test_eval_torchrun_mismatched_checkpoint_exits_2_before_launch(tmp_path, no_torchrun):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec_path, spec = _write_spec(tmp_path)
    from conftest import make_tiny_spec

    wide = make_tiny_spec(**{"model.ffn_hidden_size": 96})
    ckpt = tmp_path / "ckpt"
    write_synthetic_checkpoint(ckpt, wide, omit=("decoder.final_layernorm.weight",))
    r = CliRunner().invoke(app, ["eval", str(spec_path), "--load", str(ckpt), "--nproc-per-node", "2"], env=ENV)
    assert r.exit_code == 2, r.output
    assert no_torchrun == []  # refused before torchrun
    assert "missing: decoder.final_layernorm.weight" in r.output
    assert "mis-shaped: decoder.layers.mlp.linear_fc1.weight" in r.output
    assert "Traceback" not in r.output


def test_eval_torchrun_matching_checkpoint_launches(tmp_path, no_torchrun):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec_path, spec = _write_spec(tmp_path)
    ckpt = tmp_path / "ckpt"
    write_synthetic_checkpoint(ckpt, spec)
    r = CliRunner().invoke(app, ["eval", str(spec_path), "--load", str(ckpt), "--nproc-per-node", "2"], env=ENV)
    assert r.exit_code == 0, r.output
    assert len(no_torchrun) == 1 and "--eval" in no_torchrun[0]


def test_eval_torchrun_unreadable_checkpoint_exits_2(tmp_path, no_torchrun):
    spec_path, _ = _write_spec(tmp_path)
    r = CliRunner().invoke(app, ["eval", str(spec_path), "--load", str(tmp_path / "nope"), "--nproc-per-node", "2"],
                           env=ENV)
    assert r.exit_code == 2, r.output
    assert no_torchrun == []


def test_preflight_accepts_a_trained_checkpoint_under_other_layouts(tmp_path):
    """No false refusals: a checkpoint written by `dsv4 train` (1 process) passes for TP=2, PP=2, DP=2."""
    from dsv4cli.spec.load import load_spec
    from dsv4cli.train.entry import run
    from dsv4cli.train.launch import preflight_eval

    spec_path, _ = _write_spec(tmp_path)
    run_dir = tmp_path / "run"
    assert run(str(spec_path), ["train.steps=1", "train.eval_interval=0", f'checkpoint.dir="{run_dir}"']) == 0
    for layout in (["parallel.tp=2"], ["parallel.pp=2"], []):
        spec = load_spec(str(spec_path), layout + ["launch.nproc_per_node=2"], world_size=2)
        assert preflight_eval(spec, str(run_dir)) is None, layout
    wide = load_spec(str(spec_path), ["model.hidden_size=64"])
    problem = preflight_eval(wide, str(run_dir))
    assert problem is not None and "more (see all with --verbose)" in problem  # a long list is summarised
    problem = preflight_eval(wide, str(run_dir), verbose=True)
    assert "mis-shaped: embedding.word_embeddings.weight" in problem and "more (see all" not in problem
