"""`dsv4 train` front end: validation first, dry-run, torchrun argv, sbatch text, memory preflight."""

from __future__ import annotations

import shlex
from pathlib import Path

from test_train_e2e import cli, write_small_spec

from dsv4cli.train.launch import launch_overrides, plan_launch, slurm_script, torchrun_launcher


def test_dry_run_prints_resolved_spec_and_exact_torchrun_command(tmp_path):
    spec = write_small_spec(tmp_path)
    r = cli("train", str(spec), "--dry-run", "--nproc-per-node", "2", "--set", "parallel.tp=2",
            "--rdzv-endpoint", "host1:29999")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "[model]" in out and "hidden_size = 32" in out and "tp = 2" in out
    line = [ln for ln in out.splitlines() if "dsv4cli.train.entry" in ln]
    assert len(line) == 1
    argv = shlex.split(line[0])
    assert argv[0].endswith("torchrun") or argv[1:3] == ["-m", "torch.distributed.run"]
    for flag, value in (("--nproc-per-node", "2"), ("--nnodes", "1"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "host1:29999")):
        assert argv[argv.index(flag) + 1] == value, (flag, argv)
    assert argv[argv.index("-m") + 1] == "dsv4cli.train.entry"
    assert str(spec) in argv and "parallel.tp=2" in argv
    assert not (tmp_path / "run").exists(), "a dry run starts nothing"


def test_invalid_spec_exits_2_with_validate_messages_and_starts_nothing(tmp_path):
    spec = write_small_spec(tmp_path)
    r = cli("train", str(spec), "--set", "parallel.tp=3")
    v = cli("validate", str(spec), "--set", "parallel.tp=3")
    assert r.exit_code == 2 and v.exit_code == 2
    assert "parallel.tp" in r.stderr and "Traceback" not in r.output
    for line in r.stderr.strip().splitlines():
        assert line in v.stderr, line
    assert not (tmp_path / "run").exists()


def test_unsupported_feature_is_an_error_in_train(tmp_path):
    spec = write_small_spec(tmp_path)
    r = cli("train", str(spec), "--set", "parallel.cp=2", "--nproc-per-node", "2", "--dry-run")
    assert r.exit_code == 2
    assert "parallel.cp" in r.stderr and "not supported" in r.stderr


def test_bf16_on_a_machine_without_cuda_is_refused_before_starting(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = write_small_spec(tmp_path)
    r = cli("train", str(spec), "--set", 'train.precision="bf16"', "--set", f"checkpoint.dir={tmp_path / 'run'}")
    assert r.exit_code == 2, r.output
    assert "train.precision" in r.stderr and "CUDA" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_memory_preflight_refuses_with_numbers(tmp_path):
    spec = write_small_spec(tmp_path)
    big = ["--set", "model.hidden_size=16384", "--set", "model.num_layers=64", "--set", "model.ffn_hidden_size=65536",
           "--set", "model.num_attention_heads=128"]
    r = cli("train", str(spec), *big)
    assert r.exit_code == 2, r.output
    assert "does not fit" in r.stderr and "GiB" in r.stderr and "--force" in r.stderr
    assert not (tmp_path / "run").exists()


def test_launch_flags_become_launch_overrides():
    assert launch_overrides(4, 2, 1, "h:1") == [
        "launch.nproc_per_node=4", "launch.nnodes=2", "launch.node_rank=1", 'launch.rdzv_endpoint="h:1"']
    assert launch_overrides() == []


def test_slurm_script_runs_the_same_torchrun_on_every_node(tmp_path):
    spec = write_small_spec(tmp_path)
    out = tmp_path / "job.sbatch"
    r = cli("train", str(spec), "--slurm", str(out), "--nnodes", "2", "--nproc-per-node", "2",
            "--set", "train.global_batch_size=8")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "srun" in text and "$SLURM_NODEID" in text and "$MASTER_ADDR:$MASTER_PORT" in text
    launch = [ln for ln in text.splitlines() if ln.startswith("LAUNCH=")][0]
    inner = shlex.split(launch[len("LAUNCH="):])[0]
    argv = shlex.split(inner)
    launcher = torchrun_launcher()  # the torchrun of the environment dsv4 runs in, not whatever is on PATH
    assert argv[:len(launcher)] == launcher and Path(launcher[0]).is_absolute()
    assert argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("dsv4cli.train.entry") - 1] == "-m" and str(spec.resolve()) in argv
    plan = plan_launch(str(spec), ["train.global_batch_size=8", "launch.nproc_per_node=2", "launch.nnodes=2"])
    assert slurm_script(plan) == text


def test_resume_from_a_different_model_is_refused_before_starting(tmp_path):
    from dsv4cli.spec.load import load_spec, spec_to_toml

    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    it = run / "iter_0000004"
    it.mkdir(parents=True)
    (it / ".metadata").write_bytes(b"")
    saved = load_spec(spec, ["model.mhc.streams=2", "model.mtp.depth=2"], rules=False)
    (it / "dsv4_spec.toml").write_text(spec_to_toml(saved))
    (run / "latest_checkpointed_iteration.txt").write_text("4\n")
    r = cli("train", str(spec), "--set", f"checkpoint.dir={run}", "--nproc-per-node", "2",
            "--set", "train.global_batch_size=4")
    assert r.exit_code == 2, r.output
    assert "model.mhc.streams: 2 -> 4" in r.stderr and "model.mtp.depth: 2 -> 1" in r.stderr
    assert "(2 keys)" in r.stderr and "--set checkpoint.dir=NEW_DIR" in r.stderr  # says what to do
    assert not (run / "metrics.jsonl").exists(), "nothing was started"
