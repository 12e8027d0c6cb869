"""What a user reads: validate piped at 80 columns, --help labels, the end-of-run summary and hints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

REPO = Path(__file__).resolve().parents[1]


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_validate_piped_at_80_columns_keeps_every_file_line_and_value_whole(tmp_path):
    # A spec deep in a directory tree, extending a repository spec, with a long checkpoint.dir.
    deep = tmp_path / "a-rather-long-directory-name" / "and-another-one-below-it"
    deep.mkdir(parents=True)
    spec = deep / "variant-with-a-long-name.toml"
    spec.write_text(f'extends = "{REPO / "specs" / "dsv4-flash.toml"}"\nname = "variant"\n\n'
                    f'[checkpoint]\ndir = "{tmp_path}/runs/a-run-directory-with-a-long-name-too"\n')
    env = dict(os.environ, COLUMNS="80", TERM="dumb")
    cmd = [sys.executable, "-m", "dsv4cli.cli", "validate", str(spec), "--resolved"]
    out_file = tmp_path / "out.txt"
    with open(out_file, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=120)
    out = out_file.read_text()
    assert r.returncode == 0, out
    assert "…" not in out and "..." not in out, "a cell was cut"
    info = json.loads(subprocess.run(cmd[:-1] + ["--json"], capture_output=True, text=True, env=env,
                                     cwd=tmp_path, timeout=120).stdout)
    resolved = {k: v for k, v in _flat(info["summary"]["spec"]).items() if v is not None}
    assert len(resolved) > 40
    lines = out.splitlines()
    for key, value in resolved.items():
        line = next((ln for ln in lines if ln.strip().startswith(f"{key} = ")), None)
        assert line is not None, key
        assert f"{key} = {json.dumps(value)}" in line, (key, line)  # the value whole, on the key's line
        assert re.search(r"# (\S+:\d+|default)$", line), line  # FILE:LINE (or default) whole, at its end
    flash_lines = re.findall(r"# (\S*dsv4-flash\.toml):(\d+)$", out, re.M)
    assert len(flash_lines) > 20 and all(Path(f).name == "dsv4-flash.toml" for f, _ in flash_lines)
    assert f"# {spec}:5" in out  # checkpoint.dir, set in the variant's line 5
    total = info["summary"]["params"]["total"]
    assert f"{total:,}" in out and "torchrun --nnodes 16" in out  # estimates after the listing
    assert out.index("Parameters") > out.index("Resolved spec")


def _help(*args: str) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    return r.output


COMMANDS = [("validate",), ("schema",), ("train",), ("eval",), ("prepare-data",), ("plot",), ("convert-ckpt",),
            ("inspect", "spec"), ("inspect", "model"), ("inspect", "checkpoint"), ("inspect", "diff")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_help_names_values_plainly(command):
    text = _help(*command)
    assert not re.search(r"\{[A-Z_.]+\}|<(str|int|float|list\[|int range|float range)", text), text
    assert "[required]" not in text and "Usage: dsv4 " in text


def test_command_lists_show_whole_summaries_and_train_has_examples():
    for text in (_help(), _help("inspect")):
        assert not re.search(r"\w\.\.\.$", text, re.M), text  # no summary cut with "..."
    assert "contraction." in _help().split("convert-ckpt")[1]  # the whole first sentence
    train = _help("train")
    assert "Examples:" in train and "dsv4 train specs/tiny.toml --set train.steps=" in train
    assert "train.steps" not in _help("eval")  # eval's --set example is about the model


def test_summary_says_what_was_done_and_what_to_run_next(tmp_path, monkeypatch):
    from dsv4cli.spec.load import load_spec
    from dsv4cli.train.summary import nothing_to_do, summary_lines

    monkeypatch.chdir(REPO)
    spec = load_spec(REPO / "specs" / "tiny.toml", ["model.mhc.streams=8", "train.steps=30"])
    spec._root = "specs/tiny.toml"
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 10, "loss": 3.0, "eval_loss": 2.9}, {"step": 20, "loss": 2.5, "eval_loss": 2.4},
            {"step": 30, "loss": 2.2, "eval_loss": 2.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = summary_lines(spec, run, steps_run=30, step=30, tokens_seen=30720, seconds=75.0, last_loss=2.2,
                          last_eval=(30, 2.6))
    text = "\n".join(lines)
    assert "training finished: step 30/30" in text and "30,720 tokens" in text and "1 min 15 s" in text
    assert "held-out loss: 2.6000 at step 30; best 2.4000 at step 20" in text
    assert f"{run / 'metrics.jsonl'}" in text
    assert f"dsv4 eval specs/tiny.toml --load {run} --set model.mhc.streams=8" in text  # same model
    assert f"dsv4 plot {run}" in text
    stopped = "\n".join(summary_lines(spec, run, steps_run=5, step=5, tokens_seen=5120, seconds=3.0,
                                      last_loss=4.0, last_eval=None, stopped="by signal"))
    assert "training stopped by signal: step 5/30" in stopped and "resume with the same command" in stopped
    done = nothing_to_do(spec, run, 30)
    assert "--set train.steps=60" in done and f"--set checkpoint.dir={run}-2" in done


def test_model_differs_message_counts_keys_and_says_what_to_do(tmp_path):
    from dsv4cli.spec.load import load_spec, spec_to_toml
    from dsv4cli.ckpt.conformance import check_model_spec
    from dsv4cli.ckpt.errors import CheckpointError

    saved = load_spec(REPO / "specs" / "tiny.toml")
    (tmp_path / "dsv4_spec.toml").write_text(spec_to_toml(saved))
    with pytest.raises(CheckpointError) as e:
        check_model_spec(tmp_path, load_spec(REPO / "specs" / "tiny.toml", ["model.mhc.streams=8"]))
    msg = str(e.value)
    assert "(1 key):" in msg and "model.mhc.streams: 4 -> 8" in msg
    assert "--set checkpoint.dir=NEW_DIR" in msg and str(tmp_path / "dsv4_spec.toml") in msg


def test_inspect_checkpoint_names_its_non_tensor_entries():
    from dsv4cli.commands.ckpt_cmds import _objects

    names = ["decoder.layers.mlp.linear_fc1._extra_state/shard_0_2", "decoder.layers.mlp.linear_fc1._extra_state/shard_1_2",
             "mtp.layers.0.e_proj._extra_state/shard_0_1", "rng_state/shard_0_1"]
    text = _objects(names)
    assert "_extra_state of 2 linear modules" in text and text.endswith("rng_state")
