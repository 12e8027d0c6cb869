"""Forward + backward on CPU across streams x MTP depth x contraction; recompute gives the same grads;
MoE builds and trains; unsupported router options fail with a clear error."""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_1proc")

S, B = 16, 2


def _build(spec, seed=5):
    from megatron.core import tensor_parallel

    from dsv4cli.build import build_model

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return build_model(spec)


def _fwd_bwd(model, seed=0):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4cli.compat.versions import mtp_tracked_losses

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S).contiguous()
    MTPLossLoggingHelper.tracker.clear()
    model.train()
    loss = model(ids, pos, None, labels=ids, loss_mask=torch.ones(B, S))
    assert loss.shape == (B, S)
    loss.mean().backward()
    mtp = mtp_tracked_losses()
    return loss.detach(), (mtp.clone() if mtp is not None else None)


# streams = 1 has no contraction, so "average" would build the same model as "learned" there.
MATRIX = [(n, d, m) for n, d, m in itertools.product([1, 2, 4], [0, 1, 2], ["learned", "average"])
          if not (n == 1 and m == "average")]


@pytest.mark.parametrize("streams,depth,mode", MATRIX)
def test_forward_backward_reaches_every_parameter(tiny_spec, streams, depth, mode):
    spec = tiny_spec(**{"model.mhc.streams": streams, "model.mtp.depth": depth, "model.contraction.mode": mode})
    model = _build(spec)
    loss, mtp = _fwd_bwd(model)
    assert torch.isfinite(loss).all()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"no gradient for {no_grad}"
    # Zero by the math, not by a bug: the first attention mixes n identical copies of the embedding
    # (H_res columns sum to 1), and the MLP right before an average contraction whose streams go no
    # further (last decoder layer without MTP, last MTP depth) only sees H_res's row sums (converged to 1).
    exempt = {"decoder.layers.0.self_attention_hyper_connection.alpha_res"}
    if mode == "average":
        last = f"mtp.layers.{depth - 1}.transformer_layer" if depth else "decoder.layers.1"
        exempt.add(f"{last}.mlp_hyper_connection.alpha_res")
    zero = [n for n, p in model.named_parameters() if not torch.any(p.grad != 0) and n not in exempt]
    assert not zero, f"zero gradient for {zero}"
    names = [n for n, _ in model.named_parameters()]
    assert any("hyper_connection" in n for n in names) == (streams > 1)
    assert any("hc_head_" in n for n in names) == (streams > 1 and mode == "learned")
    if depth:
        assert mtp is not None and mtp.shape == (depth,) and torch.all(mtp > 0)  # per depth, unscaled CE
        assert abs(mtp[0].item() - loss.mean().item()) < 2.0  # same magnitude as the main CE (~log V)
    else:
        assert mtp is None


@pytest.mark.parametrize("recompute", ["full", ["mhc"], ["mhc", "core_attn", "mlp", "layernorm"]])
def test_recompute_gives_identical_gradients(tiny_spec, recompute):
    base = dict(**{"model.mhc.streams": 2, "model.mtp.depth": 1})
    plain = _build(tiny_spec(**base))
    again = _build(tiny_spec(**base, **{"train.recompute": recompute}))
    again.load_state_dict(plain.state_dict())
    la, _ = _fwd_bwd(plain)
    lb, _ = _fwd_bwd(again)
    assert torch.allclose(la, lb, atol=1e-6)
    ga, gb = dict(plain.named_parameters()), dict(again.named_parameters())
    worst = max((ga[n].grad - gb[n].grad).abs().max().item() for n in ga)
    assert worst <= 1e-6, f"recompute {recompute} changes gradients by {worst}"


def test_moe_model_forward_backward(tiny_spec):
    spec = tiny_spec(**{
        "model.mhc.streams": 2, "model.mtp.depth": 1,
        "model.moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "expert_ffn_hidden_size": 16,
                      "score_function": "sigmoid"},
    })
    model = _build(spec)
    loss, _ = _fwd_bwd(model)
    assert torch.isfinite(loss).all()
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.layers.0.mlp.router.weight" in names
    assert "decoder.layers.0.mlp.shared_experts.linear_fc1.weight" in names
    assert "mtp.layers.0.transformer_layer.mlp.experts.local_experts.3.linear_fc2.weight" in names
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n or "hyper" in n)


@pytest.mark.parametrize("moe,other,key", [
    ({"hash_layers": 1}, {}, "model.moe.hash_layers: hash routing (hash_layers > 0) is not supported with this score"),
    ({"hash_layers": 1, "score_function": "sqrtsoftplus"}, {"model.mhc.streams": 1},
     "model.moe.hash_layers: hash routing (hash_layers > 0) is not supported with model.mhc.streams = 1"),
    ({"score_function": "sqrtsoftplus", "aux_loss_coeff": 0.01}, {}, "model.moe.aux_loss_coeff: an auxiliary"),
])
def test_router_options_not_built_raise_clear_error(tiny_spec, moe, other, key):
    from dsv4cli.build import UnsupportedSpecError, transformer_config

    spec = tiny_spec(**{"model.moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16, **moe}, **other})
    with pytest.raises(UnsupportedSpecError, match=key.replace("(", r"\(").replace(")", r"\)")):
        transformer_config(spec)


def test_sqrtsoftplus_hash_routed_clamped_moe_trains(tiny_spec):
    """DeepSeek-V4's MoE from the spec: hash router on layer 0 (token ids threaded from the model),
    sqrt(softplus) top-k elsewhere (MTP too), clamped SwiGLU; every router and expert gets a gradient
    (the hash table and the expert bias are buffers)."""
    from dsv4cli.model.dsv4.router import HashRouter, SqrtSoftplusTopKRouter

    moe = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16, "num_shared_experts": 1,
           "score_function": "sqrtsoftplus", "hash_layers": 1, "swiglu_limit": 0.5, "routed_scaling_factor": 1.5}
    spec = tiny_spec(**{"model.moe": moe})
    model = _build(spec)
    assert isinstance(model.decoder.layers[0].mlp.router, HashRouter)
    assert isinstance(model.decoder.layers[1].mlp.router, SqrtSoftplusTopKRouter)
    assert isinstance(model.mtp.layers[0].transformer_layer.mlp.router, SqrtSoftplusTopKRouter)
    assert model.config.activation_func_clamp_value == 0.5
    loss, _ = _fwd_bwd(model)
    assert torch.isfinite(loss).all()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n or "experts" in n)
    # full recompute re-runs the hash-routed layer in backward with its own micro-batch's token ids
    again = _build(spec.model_copy(update={"train": spec.train.model_copy(update={"recompute": "full"})}))
    assert again.config.recompute_granularity == "full"
    loss_rc, _ = _fwd_bwd(again)
    assert torch.equal(loss, loss_rc)
    grads = dict(model.named_parameters())
    for n, p in again.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, atol=1e-6, rtol=0), n
    router = model.decoder.layers[0].mlp.router
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S).contiguous()
    model.eval()
    with torch.no_grad():
        before = model(ids, pos, None, labels=ids)
        router.tid2eid.copy_((router.tid2eid + 1) % 4)  # other experts for every token id
        after = model(ids, pos, None, labels=ids)
    assert not torch.allclose(before, after), "the hash table (looked up by the model's token ids) is not used"
    with pytest.raises(RuntimeError, match="token ids"):  # called without them
        model.decoder.layers[0](torch.randn(S, B, model.decoder.streams * 32))


def test_mtp_loss_scale_enters_gradients_linearly(tiny_spec):
    """MTP losses reach the gradient as (loss_scale / D) * CE_k: MTP-only params scale with loss_scale."""
    base = {"model.mhc.streams": 2, "model.mtp.depth": 2}
    small = _build(tiny_spec(**base, **{"model.mtp.loss_scale": 0.1}))
    large = _build(tiny_spec(**base, **{"model.mtp.loss_scale": 0.4}))
    large.load_state_dict(small.state_dict())
    _, mtp_small = _fwd_bwd(small)
    _, mtp_large = _fwd_bwd(large)
    assert torch.allclose(mtp_small, mtp_large)  # the tracker holds unscaled per-depth CE
    gs, gl = dict(small.named_parameters()), dict(large.named_parameters())
    for name in ("mtp.layers.1.hc_head_fn", "mtp.layers.0.e_proj.weight", "mtp.layers.1.final_layernorm.weight"):
        assert torch.allclose(gl[name].grad, 4 * gs[name].grad, rtol=1e-4, atol=1e-9), name


def test_mtp_must_share_the_last_stage_with_the_loss_when_streams_gt_1(tiny_spec):
    from dsv4cli.build import UnsupportedSpecError, check_supported, transformer_config

    standalone = tiny_spec(**{"model.mhc.streams": 2, "parallel.pp": 3, "parallel.pp_layout": "Ett|m|L"})
    with pytest.raises(UnsupportedSpecError, match="parallel.pp_layout: MTP layers outside the last pipeline stage"):
        check_supported(standalone)
    check_supported(tiny_spec(**{"model.mhc.streams": 1, "parallel.pp": 3, "parallel.pp_layout": "Ett|m|L"}))
    config = transformer_config(tiny_spec(**{"model.mhc.streams": 2, "parallel.pp": 2, "parallel.pp_layout": "Ett|mL"}))
    assert config.pipeline_model_parallel_layout is not None and config.mtp_num_layers == 1
    with pytest.raises(ValueError, match="tp\\*pp\\*cp"):
        transformer_config(tiny_spec(**{"parallel.tp": 2}), world_size=3)


def _saved_nn_tensors(hc, x, n: int) -> tuple[int, int]:
    """(count of saved [.., n, n] tensors, total saved bytes) of one HyperConnection forward."""
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hc(x, lambda u: u * 2.0)
    out.sum().backward()
    return sum(1 for s, _ in shapes if s[-2:] == (n, n)), sum(b for _, b in shapes)


def _dsv4_config(h: int, **dsv4):
    """A one-layer Dsv4TransformerConfig of width h with the given mhc_* / contraction_* fields."""
    from dsv4cli.model.config import Dsv4TransformerConfig

    return Dsv4TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=1, **dsv4)


def test_mhc_recompute_stores_no_sinkhorn_intermediates():
    """No Sinkhorn iterates are kept either way: the mappings' hand-written backward recomputes them
    (only the final H_res, used by the residual mix, is an [n, n] tensor kept). train.recompute "mhc"
    also drops the projection [T, n*n+2n] and rsqrt [T, 1] (recomputed in backward)."""
    from dsv4cli.model.hyper_connection import HyperConnection

    n, h = 4, 32
    plain = HyperConnection(_dsv4_config(h, mhc_streams=n, mhc_sinkhorn_iterations=20))
    recomputed = HyperConnection(_dsv4_config(h, mhc_streams=n, mhc_sinkhorn_iterations=20, mhc_recompute=True))
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(S, B, n * h, requires_grad=True)
    stored, stored_bytes = _saved_nn_tensors(plain, x, n)
    grad_plain = x.grad.clone()
    x.grad = None
    kept, kept_bytes = _saved_nn_tensors(recomputed, x, n)
    assert stored <= 1 and kept <= 1, (stored, kept)
    assert kept_bytes < stored_bytes, (kept_bytes, stored_bytes)
    assert torch.allclose(x.grad, grad_plain, atol=1e-6)
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(plain.parameters(), recomputed.parameters()))


def test_layernorm_recompute_runs_on_cpu_and_keeps_gradients(tiny_spec):
    """train.recompute "layernorm" (megatron's CheckpointWithoutOutput), plain and mHC layers."""
    for streams in (1, 2):
        base = {"model.mhc.streams": streams, "model.mtp.depth": 1}
        plain = _build(tiny_spec(**base))
        again = _build(tiny_spec(**base, **{"train.recompute": ["layernorm"]}))
        again.load_state_dict(plain.state_dict())
        assert again.decoder.layers[0].recompute_input_layernorm and again.decoder.layers[0].recompute_pre_mlp_layernorm
        la, _ = _fwd_bwd(plain)
        lb, _ = _fwd_bwd(again)
        assert torch.allclose(la, lb, atol=1e-6)
        ga, gb = dict(plain.named_parameters()), dict(again.named_parameters())
        worst = max((ga[n].grad - gb[n].grad).abs().max().item() for n in ga)
        assert worst <= 1e-6, f"streams={streams}: layernorm recompute changes gradients by {worst}"


def test_bf16_model_keeps_mhc_math_fp32_and_activations_bf16(tiny_spec):
    """precision bf16: megatron weights and norms bf16, mHC/contraction parameters (and grads) fp32,
    the multi-stream state between layers stays in the activation dtype."""
    from dsv4cli.model.contraction import contract

    model = _build(tiny_spec(**{"model.mhc.streams": 2, "model.mtp.depth": 1, "train.precision": "bf16"}))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    fp32 = {n for n in dtypes if "hyper_connection" in n or "hc_head_" in n}
    assert fp32 and all(dtypes[n] == torch.float32 for n in fp32)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n not in fp32), dtypes
    seen = []
    model.decoder.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype))
    loss, _ = _fwd_bwd(model)
    assert seen == [torch.bfloat16] and torch.isfinite(loss.float()).all()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())
    x = torch.randn(S, B, 2 * 32, dtype=torch.bfloat16)
    assert contract(model.decoder, x).dtype == torch.bfloat16


def test_mhc_parameters_follow_the_requested_device():
    """Created fp32 on the default device (same init on every TP rank), then moved, still tagged."""
    from dsv4cli.model.contraction import add_contraction_params
    from dsv4cli.model.hyper_connection import HyperConnection

    meta = torch.device("meta")
    config = _dsv4_config(32, mhc_streams=2, param_device="meta")
    config.sequence_parallel = True  # megatron refuses it at tp = 1 in __post_init__; the modules only read it
    hc = HyperConnection(config)
    owner = torch.nn.Module()
    add_contraction_params(owner, config)
    params = list(hc.parameters()) + list(owner.parameters())
    assert len(params) == 8
    assert all(p.device == meta and p.dtype == torch.float32 and p.sequence_parallel for p in params)


def test_build_model_initializes_megatron_groups_when_nobody_did(tiny_spec):
    from megatron.core import parallel_state

    from dsv4cli.build import build_model

    parallel_state.destroy_model_parallel()
    assert not parallel_state.model_parallel_is_initialized()
    model = build_model(tiny_spec(**{"model.mhc.streams": 2, "model.mtp.depth": 0}))
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    loss, _ = _fwd_bwd(model)
    assert torch.isfinite(loss).all()


def test_top1_softmax_router_builds_and_trains(tiny_spec):
    """megatron rejects k=1 softmax routing unless the softmax comes first; the builder arranges that."""
    spec = tiny_spec(**{"model.mhc.streams": 2, "model.mtp.depth": 0,
                        "model.moe": {"num_experts": 4, "top_k": 1, "expert_ffn_hidden_size": 16}})
    model = _build(spec)
    assert model.config.moe_router_pre_softmax
    loss, _ = _fwd_bwd(model)
    assert torch.isfinite(loss).all()
    assert model.decoder.layers[0].mlp.router.weight.grad.abs().sum() > 0


DSV4_ATTENTION = {"layer_types": ["csa", "hca", "sliding"], "compress_ratios": [4, 8, 0], "head_dim": 16,
                  "rope_head_dim": 8, "q_lora_rank": 16, "o_groups": 2, "o_lora_rank": 8, "sliding_window": 8,
                  "index_n_heads": 2, "index_head_dim": 8, "index_topk": 2}


@pytest.mark.parametrize("other", [
    {"model.mhc.streams": 1},  # megatron's own TransformerLayer and MTP layer around DeepSeek-V4 attention
    {"model.mhc.streams": 1, "model.moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16,
                                           "score_function": "sqrtsoftplus", "swiglu_limit": 1.0}},
    {},  # mHC, dense MLP
], ids=["streams1", "streams1_moe", "mhc_dense"])
def test_deepseek_v4_attention_trains_in_every_layer_kind(tiny_spec, other):
    """[model.attention] in decoder layers (CSA, HCA) and the MTP depth (sliding): every parameter but
    the indexer's (a discrete choice) gets a gradient; full recompute gives the same loss and grads."""
    spec = tiny_spec(**{"model.attention": DSV4_ATTENTION, **other})
    model = _build(spec)
    kinds = [layer.self_attention.settings.kind for layer in model.decoder.layers]
    assert kinds == ["compressed_sparse", "heavily_compressed"]
    mtp_layer = model.mtp.layers[0]  # megatron-core >= 0.17 names the inner layer mtp_model_layer
    inner = getattr(mtp_layer, "mtp_model_layer", None) or mtp_layer.transformer_layer
    assert inner.self_attention.settings.kind == "sliding"
    loss, _ = _fwd_bwd(model)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all((g is None) == (".indexer." in n) for n, g in grads.items()), [n for n, g in grads.items() if g is None]
    again = _build(spec.model_copy(update={"train": spec.train.model_copy(update={"recompute": "full"})}))
    loss_rc, _ = _fwd_bwd(again)
    assert torch.equal(loss, loss_rc)
    for n, p in again.named_parameters():
        assert (p.grad is None and grads[n] is None) or torch.allclose(p.grad, grads[n], atol=1e-6, rtol=0), n
