"""The built model's parameters equal the spec-only estimate of `dsv4 validate`; `dsv4 inspect model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("megatron_1proc")

TINY = str(Path(__file__).resolve().parent.parent / "specs" / "tiny.toml")

VARIANTS = {
    "tiny": [],
    "streams1": ["model.mhc.streams=1"],
    "streams2_mtp2": ["model.mhc.streams=2", "model.mtp.depth=2"],
    "streams4_mtp0": ["model.mhc.streams=4", "model.mtp.depth=0"],
    "average_mtp2": ["model.contraction.mode=\"average\"", "model.mtp.depth=2"],
    "tied": ["model.tie_embeddings=true"],
    "moe": ["model.moe={num_experts=4, top_k=2, num_shared_experts=1, expert_ffn_hidden_size=32}"],
    "gqa_tp2_vocab": ["model.num_query_groups=2", "model.vocab_size=300", "parallel.tp=2"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_built_parameters_equal_spec_estimate(variant):
    from megatron.core import tensor_parallel

    from dsv4cli.build import build_model
    from dsv4cli.build.model_summary import inspect_model
    from dsv4cli.model.inventory import param_inventory as model_inventory
    from dsv4cli.spec.estimate import param_inventory as spec_inventory
    from dsv4cli.spec.load import load_spec

    spec = load_spec(TINY, VARIANTS[variant], rules=False)
    estimate = sorted((n, tuple(s)) for n, s in spec_inventory(spec))
    if spec.parallel.tp == 1:
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        built = sorted(model_inventory(build_model(spec)))
        assert built == estimate, (sorted(set(built) - set(estimate)), sorted(set(estimate) - set(built)))
    report = inspect_model(spec)  # builds in one process, keeping the spec's vocab padding
    assert sorted(report.params) == estimate
    assert report.total == sum(__import__("math").prod(s) for _, s in estimate)


def test_inspect_model_cli_json_and_tree():
    from typer.testing import CliRunner

    from dsv4cli.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["inspect", "model", TINY, "--set", "model.mtp.depth=2", "--json"],
                        env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["matches_estimate"] is True
    names = {p["name"] for p in data["params"]}
    assert {"decoder.hc_head_fn", "mtp.layers.1.hc_head_fn", "mtp.layers.1.e_proj.weight"} <= names
    decoder = next(c for c in data["tree"]["children"] if c["name"] == "decoder")
    layers = next(c for c in decoder["children"] if c["name"] == "layers")
    assert [(c["name"], c["repeat"]) for c in layers["children"]] == [("0..1", 2)]  # folded
    assert data["total_params"] == sum(data["by_group"].values())
    # the table's module counts are the tree's: a module counts everything below it
    tree = {c["name"]: c["params"] for c in data["tree"]["children"] if c["params"]}
    assert {k: v["params"] for k, v in data["by_module"].items()} == tree
    assert data["by_module"]["decoder"]["mhc"] + data["by_module"]["mtp"]["mhc"] == data["by_group"]["mhc"]

    res = runner.invoke(app, ["inspect", "model", TINY], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.output.splitlines() if ln.strip("│ ").startswith("decoder "))
    assert f"{tree['decoder']:,}" in row and f"decoder (MultiStreamTransformerBlock)  {tree['decoder']:,}" in res.output
    assert "0..1 (MultiStreamTransformerLayer) x2" in res.output
    assert "matches the validate estimate: yes" in res.output


def test_inspect_model_cli_bad_input_exits_2(tmp_path):
    from typer.testing import CliRunner

    from dsv4cli.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["inspect", "model", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", "model", TINY, "--set", "parallel.tp=3"])
    assert res.exit_code == 2 and "parallel.tp" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnum_layers = 0\n")
    res = runner.invoke(app, ["inspect", "model", str(bad)])
    assert res.exit_code == 2 and "bad.toml" in res.output and "Traceback" not in res.output


def test_inspect_model_builds_deepseek_v4_routers():
    """sqrtsoftplus / hash routing are built (no stand-in): the tree names DeepSeek-V4's routers and
    the parameters (the tables and biases are buffers) still equal the estimate."""
    from typer.testing import CliRunner

    from dsv4cli.cli import app

    moe = "model.moe={num_experts=4, top_k=2, expert_ffn_hidden_size=8, score_function=\"sqrtsoftplus\", hash_layers=1}"
    res = CliRunner().invoke(app, ["inspect", "model", TINY, "--set", moe, "--json"],
                             env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["matches_estimate"] is True and "warnings" not in data
    tree = json.dumps(data["tree"])
    assert "HashRouter" in tree and "SqrtSoftplusTopKRouter" in tree and "Dsv4MoELayer" in tree
    assert "decoder.layers.0.mlp.router.weight" in {p["name"] for p in data["params"]}


def test_inspect_model_handles_a_13b_spec_without_allocating():
    import time

    from dsv4cli.build.model_summary import inspect_model
    from dsv4cli.spec.estimate import param_inventory
    from dsv4cli.spec.load import load_spec

    spec = load_spec(TINY, ["model.hidden_size=8192", "model.ffn_hidden_size=22016", "model.num_layers=16",
                            "model.num_attention_heads=64", "model.vocab_size=129280"], rules=False)
    start = time.perf_counter()
    report = inspect_model(spec)  # meta tensors: ~13e9 fp32 parameters would need ~52 GB
    assert report.total > 12e9
    assert sorted(report.params) == sorted((n, tuple(s)) for n, s in param_inventory(spec))
    assert time.perf_counter() - start < 60


def test_inspect_model_stays_on_meta_where_the_builder_would_place_parameters_on_a_gpu(monkeypatch):
    """On a GPU machine the builder asks for dsv4's own parameters on CUDA (config.param_device);
    inspection builds on the meta device all the same (no allocation, no CUDA call)."""
    from dsv4cli.build.model_summary import inspect_model
    from dsv4cli.compat import device
    from dsv4cli.spec.estimate import param_inventory
    from dsv4cli.spec.load import load_spec

    monkeypatch.setattr(device, "on_cpu", lambda: False)  # what transformer_config reads
    spec = load_spec(TINY.replace("tiny.toml", "tiny-dsv4.toml"), [], rules=False)
    report = inspect_model(spec)
    assert sorted(report.params) == sorted((n, tuple(s)) for n, s in param_inventory(spec))
