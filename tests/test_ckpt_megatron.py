"""Checkpoint tools on real checkpoints saved by megatron-core's dist_checkpointing from dsv4 models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

pytestmark = pytest.mark.usefixtures("megatron_1proc")
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
HC = ("hc_head_fn", "hc_head_base", "hc_head_scale")


def _spec(mode: str, depth: int = 2):
    from conftest import make_tiny_spec

    return make_tiny_spec(**{"model.contraction.mode": mode, "model.mtp.depth": depth})


def _stored_keys(model) -> dict[str, tuple]:
    """{checkpoint key: global shape} of a model's sharded state dict (tensors and factories)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for v in model.sharded_state_dict(prefix="").values():
        if isinstance(v, ShardedTensor):
            out[v.key] = tuple(v.global_shape)
        elif isinstance(v, ShardedTensorFactory):
            out[v.key] = None  # SwiGLU fc1: shape checked against the inventory by conformance
    return out


def save_model_checkpoint(spec, root: Path, seed: int, drop: tuple[str, ...] = (), iteration: int = 3):
    """Build spec's model, save it with megatron dist_checkpointing as root/iter_XXXXXXX (+ dsv4_spec.toml)."""
    import torch
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from dsv4cli.build import build_model
    from dsv4cli.spec.load import spec_to_toml

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():  # make the learned/average difference visible if conversion were wrong
        for name, p in model.named_parameters():
            if "hc_head_fn" in name:
                p.normal_(0, 0.1)
    sd = {k: v for k, v in model.sharded_state_dict(prefix="").items()
          if not (isinstance(v, ShardedBase) and v.key.endswith(drop) and drop)}
    it = root / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    dist_checkpointing.save({"model": sd}, str(it))
    (it / "dsv4_spec.toml").write_text(spec_to_toml(spec))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return model


def test_inspect_lists_exactly_the_tensors_the_model_has(tmp_path):
    spec = _spec("learned")
    model = save_model_checkpoint(spec, tmp_path / "ck", seed=1)
    res = CliRunner().invoke(app, ["inspect", "checkpoint", str(tmp_path / "ck"), "--json"], env=ENV)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    stored = {t["name"]: tuple(t["shape"]) for t in r["tensors"]}
    expected = _stored_keys(model)
    assert set(stored) == set(expected)
    assert {k: v for k, v in stored.items() if expected[k] is not None} == {
        k: v for k, v in expected.items() if v is not None
    }
    assert r["total_params"] == sum(p.numel() for p in model.parameters())
    assert r["conformant"] is True, r["problems"]
    assert r["legacy"] is False and r["problems"] == []


def test_inspect_flags_a_checkpoint_with_hc_head_removed(tmp_path):
    spec = _spec("learned")
    save_model_checkpoint(spec, tmp_path / "ck", seed=2, drop=HC)
    res = CliRunner().invoke(app, ["inspect", "checkpoint", str(tmp_path / "ck"), "--json"], env=ENV)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["conformant"] is False and r["legacy"] is True
    missing = {p["name"] for p in r["problems"] if p["kind"] == "missing"}
    blocks = ["decoder."] + [f"mtp.layers.{k}." for k in range(2)]
    assert missing == {b + n for b in blocks for n in HC}
    assert r["fix_command"].startswith("dsv4 convert-ckpt ")
    assert not [p for p in r["problems"] if p["kind"] in ("unexpected", "mis-shaped")]


def test_converted_checkpoint_reproduces_legacy_logits(tmp_path):
    from dsv4cli.ckpt.convert import convert_checkpoint
    from dsv4cli.ckpt.tensors import load_all_tensors

    save_model_checkpoint(_spec("average"), tmp_path / "legacy", seed=3)
    result = convert_checkpoint(tmp_path / "legacy", tmp_path / "learned", verify=True)
    assert result.status == "converted" and result.optimizer == "none"
    assert sorted(result.added) == sorted(b + n for b in ["decoder."] + [f"mtp.layers.{k}." for k in range(2)] for n in HC)
    checks = {c["check"]: c for c in result.verify["checks"]}
    assert set(checks) == {"contraction", "model"}, result.verify
    model = checks["model"]
    assert model["ok"], model
    assert model["max_abs_logit_diff"] <= 1e-5, model
    assert model["loss_diff"] <= 1e-6, model
    assert result.verify["ok"] and not result.verify["skipped"]
    legacy = load_all_tensors(tmp_path / "legacy" / "iter_0000003")
    converted = load_all_tensors(tmp_path / "learned" / "iter_0000003")
    assert all((converted[k] == v).all() for k, v in legacy.items())


def test_model_check_fails_when_the_conversion_changes_the_function(tmp_path, monkeypatch):
    """Stream weights that are not all 1/n (one base entry off by 0.1) must fail both checks."""
    from dsv4cli.ckpt import convert

    real_new_tensors = convert.new_tensors

    def skewed(plan):
        out = real_new_tensors(plan)
        out["decoder.hc_head_base"][0] += 0.1
        return out

    monkeypatch.setattr(convert, "new_tensors", skewed)
    save_model_checkpoint(_spec("average", depth=1), tmp_path / "legacy", seed=4)
    result = convert.convert_checkpoint(tmp_path / "legacy", tmp_path / "learned", verify=True)
    checks = {c["check"]: c for c in result.verify["checks"]}
    assert not checks["contraction"]["ok"] and not checks["model"]["ok"], result.verify
    assert checks["model"]["max_abs_logit_diff"] > checks["model"]["tolerance"]["logits"]
    assert result.verify["ok"] is False


def test_moe_checkpoint_with_stacked_experts_is_conformant(tmp_path):
    """Routed experts are stored stacked (`mlp.experts.experts.*` [L, E, ...]); conformance unstacks them."""
    from conftest import make_tiny_spec

    spec = make_tiny_spec(**{"model.mtp.depth": 1, "model.moe": {
        "num_experts": 4, "top_k": 2, "num_shared_experts": 1, "expert_ffn_hidden_size": 16}})
    model = save_model_checkpoint(spec, tmp_path / "moe", seed=5)
    res = CliRunner().invoke(app, ["inspect", "checkpoint", str(tmp_path / "moe"), "--json"], env=ENV)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert set(t["name"] for t in r["tensors"]) == set(_stored_keys(model))
    assert any(".mlp.experts.experts." in t["name"] for t in r["tensors"])
    assert r["conformant"] is True, r["problems"]
    assert r["total_params"] == sum(p.numel() for p in model.parameters())
