"""Every parameter reaches megatron's sharded_state_dict and survives a torch_dist save -> load bit-exactly."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_1proc")


def _build(spec, seed):
    from megatron.core import tensor_parallel

    from dsv4cli.build import build_model

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return build_model(spec)


def _sharded_tensors(sd):
    """ShardedTensors and ShardedTensorFactories (SwiGLU fc1 is a factory) of a sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {k: v for k, v in sd.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


@pytest.fixture(scope="module")
def mhc_model():
    from conftest import make_tiny_spec

    return _build(make_tiny_spec(**{"model.mhc.streams": 4, "model.mtp.depth": 2}), seed=11)


def test_sharded_state_dict_holds_every_parameter_including_hc_head(mhc_model):
    sd = _sharded_tensors(mhc_model.sharded_state_dict())
    held = {id(t.data) for t in sd.values()}
    missing = [n for n, p in mhc_model.named_parameters() if id(p) not in held]
    assert not missing, f"parameters absent from sharded_state_dict: {missing}"
    ckpt_keys = {t.key for t in sd.values()}
    for owner in ["decoder"] + [f"mtp.layers.{k}" for k in range(2)]:
        for name in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
            assert f"{owner}.{name}" in ckpt_keys
    for sub in ("self_attention_hyper_connection", "mlp_hyper_connection"):
        for name in ("mapping_proj.weight", "alpha_pre", "alpha_post", "alpha_res", "bias"):
            assert f"decoder.layers.{sub}.{name}" in ckpt_keys  # stacked over layers
            assert f"mtp.layers.1.transformer_layer.{sub}.{name}" in ckpt_keys


def test_megatron_transformer_block_alone_would_drop_hc_head(mhc_model):
    """Pins the upstream behaviour our override exists for: TransformerBlock walks children only."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    keys = {t.key for t in _sharded_tensors(TransformerBlock.sharded_state_dict(mhc_model.decoder, "decoder.")).values()}
    assert "decoder.hc_head_fn" not in keys
    ours = {t.key for t in _sharded_tensors(mhc_model.decoder.sharded_state_dict("decoder.")).values()}
    assert {"decoder.hc_head_fn", "decoder.hc_head_base", "decoder.hc_head_scale"} <= ours


def test_torch_dist_save_load_round_trip_is_bit_exact(mhc_model, tmp_path):
    from megatron.core import dist_checkpointing

    from conftest import make_tiny_spec

    dist_checkpointing.save(mhc_model.sharded_state_dict(), str(tmp_path))
    fresh = _build(make_tiny_spec(**{"model.mhc.streams": 4, "model.mtp.depth": 2}), seed=99)
    before = dict(fresh.named_parameters())
    assert not torch.equal(before["decoder.hc_head_fn"], dict(mhc_model.named_parameters())["decoder.hc_head_fn"])
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path))
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    src = dict(mhc_model.named_parameters())
    differ = [n for n, p in fresh.named_parameters() if not torch.equal(p, src[n])]
    assert not differ, f"not restored bit-exactly: {differ}"


def test_mhc_and_contraction_params_stay_fp32_under_bfloat16(tiny_spec):
    model = _build(tiny_spec(**{"model.mhc.streams": 2, "model.mtp.depth": 1}), seed=3).bfloat16()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    special = [n for n in dtypes if "hyper_connection" in n or "hc_head_" in n]
    assert special and all(dtypes[n] == torch.float32 for n in special), {n: dtypes[n] for n in special}
    assert dtypes["decoder.layers.0.self_attention.linear_qkv.weight"] == torch.bfloat16
