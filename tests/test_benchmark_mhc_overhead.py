"""benchmarks/mhc_overhead.py: reading step times from metrics.jsonl and the pooled-median ratio."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mhc_overhead", ROOT / "benchmarks" / "mhc_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_times_skip_leading_steps_and_non_step_records(bench, tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 1.0, "step_time_s": 0.1 * s} for s in range(1, 6)]
    recs.insert(3, {"event": "checkpoint", "step": 3})  # no step_time_s: ignored
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert bench.step_times(path, skip=2) == pytest.approx([0.3, 0.4, 0.5])


def test_summarize_pools_runs_and_divides_last_by_first(bench):
    out = bench.summarize({1: [[0.1, 0.3], [0.2]], 4: [[0.5, 0.4], [0.3, 0.9]]})
    assert out["median_step_time_s"] == pytest.approx({1: 0.2, 4: 0.45})
    assert out["ratio"] == pytest.approx(2.25)
    assert out["run_medians_s"][4] == [0.45, 0.6]


def test_bench_spec_has_the_contract_dims():
    import tomllib

    spec = tomllib.loads((ROOT / "specs" / "bench-mhc.toml").read_text())
    m, t = spec["model"], spec["train"]
    assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["ffn_hidden_size"]) == (2, 128, 4, 352)
    assert (m["vocab_size"], m["seq_length"], m["mtp"]["depth"], m["mhc"]["streams"]) == (256, 128, 1, 4)
    assert "moe" not in m and "extends" not in spec
    assert (t["micro_batch_size"], t["global_batch_size"], t["log_interval"]) == (8, 8, 1)
    assert spec["data"] == {"source": "builtin", "tokenizer": "byte"}


def test_cpu_step_time_runs_train_py_for_the_stream_count_and_reads_its_json(bench, monkeypatch):
    calls = []

    class Done:
        returncode, stderr = 0, ""
        stdout = "log line\n" + json.dumps([{"streams": 4, "step_time_s": 0.2, "cpu_step_time_s": 0.125}]) + "\n"

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    assert bench.cpu_step_time("spec.toml", 4, ["train.lr=1e-3"], steps=7) == 0.125
    cmd = calls[0]
    assert cmd[1].endswith("benchmarks/train.py") and cmd[cmd.index("--streams") + 1] == "4"
    assert cmd[cmd.index("--steps") + 1] == "7" and cmd[cmd.index("--set") + 1] == "train.lr=1e-3"
