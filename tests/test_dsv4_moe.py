"""DeepSeek-V4's MoE (dsv4cli.model.dsv4: routers, clamped SwiGLU experts, the MoE block) equals HF
transformers' DeepseekV4 modules with the same weights: fp32 on CPU, forward and gradients of the
inputs and weights within 1e-5. Every parameter or buffer HF initialises to a constant (expert bias,
hash table) is random here, so ignoring one fails."""

from __future__ import annotations

import functools

import types

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

B, S, H, E, K, FFN, VOCAB, LIMIT, SCALE = 2, 7, 16, 6, 2, 8, 37, 0.5, 1.5
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("megatron_1proc")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hf_config(**overrides) -> DeepseekV4Config:
    sizes = dict(vocab_size=VOCAB, hidden_size=H, moe_intermediate_size=FFN, n_routed_experts=E, num_experts_per_tok=K,
                 n_shared_experts=1, routed_scaling_factor=SCALE, swiglu_limit=LIMIT, num_hidden_layers=2,
                 num_attention_heads=2, head_dim=16, q_lora_rank=8, o_groups=1, o_lora_rank=8,
                 mlp_layer_types=["hash_moe", "moe"], layer_types=["sliding_attention"] * 2)
    return DeepseekV4Config(**{**sizes, **overrides})


def mcore_config(limit=LIMIT, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dsv4cli.model.dsv4.experts import clamped_swiglu_config

    return TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, num_moe_experts=E, moe_router_topk=K,
        moe_ffn_hidden_size=FFN, moe_shared_expert_intermediate_size=FFN, moe_router_topk_scaling_factor=SCALE,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, **clamped_swiglu_config(limit), **overrides,
    )


def randomize(module: torch.nn.Module, scale: float = 0.5) -> None:
    """Every float parameter and buffer random (HF leaves them empty, zero or one)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * scale)


def random_table(vocab=VOCAB) -> torch.Tensor:
    """[vocab, K] int64: K distinct experts per token."""
    return torch.rand(vocab, E).topk(K, dim=-1).indices


def max_diff(a, b) -> float:
    return (a.detach() - b.detach()).abs().max().item()


def to_sb(x: torch.Tensor) -> torch.Tensor:
    """HF's [b, s, ...] -> megatron's [s, b, ...] (a fresh leaf when x requires grad)."""
    y = x.detach().transpose(0, 1).contiguous()
    return y.requires_grad_(x.requires_grad)


def rows_sb_to_bs(t: torch.Tensor) -> torch.Tensor:
    """Token rows flattened from [s, b] (megatron) -> flattened from [b, s] (HF)."""
    return t.reshape(S, B, *t.shape[1:]).transpose(0, 1).reshape(B * S, *t.shape[1:])


def dense(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(weights.shape[0], E).scatter(1, indices, weights)


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------
def compare_router(ours, theirs, their_args, our_kwargs):
    x = torch.randn(B, S, H, requires_grad=True)
    logits, weights, indices = theirs(x, *their_args)
    x_sb = to_sb(x)
    probs, routing_map = ours(x_sb, **our_kwargs)
    probs_bs, map_bs = rows_sb_to_bs(probs), rows_sb_to_bs(routing_map)

    assert max_diff(rows_sb_to_bs(ours.scores(x_sb)), theirs.score_fn(logits)) <= TOL
    their_map = torch.zeros(B * S, E, dtype=torch.bool).scatter(1, indices, True)
    assert torch.equal(map_bs, their_map), "chosen experts differ"
    assert max_diff(probs_bs, dense(weights, indices)) <= TOL
    assert torch.allclose(probs_bs.sum(-1), torch.full((B * S,), SCALE))

    g = torch.randn(B * S, E)
    (probs_bs * g).sum().backward()
    (dense(weights, indices) * g).sum().backward()
    assert max_diff(x_sb.grad.transpose(0, 1), x.grad) <= TOL
    assert max_diff(ours.weight.grad, theirs.weight.grad) <= TOL
    return indices


def test_topk_router_matches_hf_and_bias_moves_the_choice_only():
    from dsv4cli.model.dsv4.router import SqrtSoftplusTopKRouter

    theirs = hf.DeepseekV4TopKRouter(hf_config())
    randomize(theirs)
    ours = SqrtSoftplusTopKRouter(mcore_config())
    ours.load_state_dict({"weight": theirs.weight.detach(), "expert_bias": theirs.e_score_correction_bias})
    chosen = compare_router(ours, theirs, (), {})
    assert ours.local_tokens_per_expert.sum().item() == B * S * K

    with torch.no_grad():  # the same router without its bias chooses differently: the bias is used
        x = torch.randn(B, S, H)
        unbiased = torch.topk(ours.scores(to_sb(x)), K, dim=-1).indices
        biased = torch.topk(ours.scores(to_sb(x)) + ours.expert_bias, K, dim=-1).indices
    assert not torch.equal(unbiased.sort(-1).values, biased.sort(-1).values)
    assert chosen.shape == (B * S, K)

    ours.bfloat16()  # mixed precision casts buffers; the bias stays fp32
    ours(torch.randn(S, B, H, dtype=torch.bfloat16))
    assert ours.expert_bias.dtype == torch.float32 and ours.state_dict()["expert_bias"].dtype == torch.float32


def test_hash_router_matches_hf_and_saves_its_table():
    from dsv4cli.model.dsv4.router import HashRouter

    theirs = hf.DeepseekV4HashRouter(hf_config())
    randomize(theirs)
    theirs.tid2eid.copy_(random_table())
    ours = HashRouter(mcore_config(), vocab_size=VOCAB)
    assert ours.tid2eid.dtype == torch.int64 and ours.tid2eid.shape == (VOCAB, K)
    assert not torch.equal(ours.tid2eid, theirs.tid2eid)
    ours.load_state_dict({"weight": theirs.weight.detach(), "tid2eid": theirs.tid2eid})

    ids = torch.randint(0, VOCAB, (B, S))
    compare_router(ours, theirs, (ids,), {"token_ids": ids.t()})

    x = torch.randn(S, B, H)
    with ours.token_ids_scope(ids.t()):
        probs, _ = ours(x)
    assert torch.equal(probs, ours(x, token_ids=ids.t())[0])
    with pytest.raises(RuntimeError, match="token ids"):
        ours(x)  # the scope has ended
    with pytest.raises(ValueError, match="input_ids.t"):
        ours(x, token_ids=ids)

    keys = ours.sharded_state_dict(prefix="mlp.router.")
    assert {"mlp.router.tid2eid", "mlp.router.weight"} <= set(keys)
    assert keys["mlp.router.tid2eid"].data.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# experts with the clamp
# ---------------------------------------------------------------------------------------------
def local_mlp_submodules():
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.mlp import MLPSubmodules

    p = LocalSpecProvider()
    return MLPSubmodules(linear_fc1=p.column_parallel_linear(), linear_fc2=p.row_parallel_linear())


def shared_expert(limit=LIMIT):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    return SharedExpertMLP(mcore_config(limit), local_mlp_submodules(), gate=False,
                           pg_collection=get_default_pg_collection())


def big_inputs(*shape) -> torch.Tensor:
    """Large enough that the clamp bites (checked where used)."""
    return (torch.randn(*shape) * 1.5).requires_grad_()


def clamp_bites(gate_up: torch.Tensor) -> bool:
    gate, up = gate_up.chunk(2, dim=-1)
    return bool((gate > LIMIT).any() and (up.abs() > LIMIT).any())


def test_shared_expert_swiglu_clamp_matches_hf():
    theirs = hf.DeepseekV4MLP(hf_config())
    randomize(theirs)
    ours, unclamped = shared_expert(), shared_expert(limit=None)
    fc1 = torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]).detach()
    for m in (ours, unclamped):
        m.load_state_dict({"linear_fc1.weight": fc1, "linear_fc2.weight": theirs.down_proj.weight.detach()})
    x = big_inputs(B * S, H)
    assert clamp_bites(x @ fc1.t())
    x2 = x.detach().clone().requires_grad_()
    out = ours(x2)  # SharedExpertMLP returns the output alone
    expected = theirs(x)
    assert max_diff(out, expected) <= TOL
    assert max_diff(unclamped(x2), expected) > 1e-2  # the clamp matters for these inputs

    g = torch.randn_like(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert max_diff(x2.grad, x.grad) <= TOL
    assert max_diff(ours.linear_fc1.weight.grad, torch.cat([theirs.gate_proj.weight.grad, theirs.up_proj.weight.grad])) <= TOL
    assert max_diff(ours.linear_fc2.weight.grad, theirs.down_proj.weight.grad) <= TOL


def test_routed_experts_swiglu_clamp_matches_hf():
    """megatron's SequentialMLP on tokens permuted by expert (what the dispatcher hands it) vs HF's experts."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    theirs = hf.DeepseekV4Experts(hf_config())
    randomize(theirs)
    ours = SequentialMLP(E, mcore_config(), local_mlp_submodules(), pg_collection=get_default_pg_collection())
    ours.load_state_dict({f"local_experts.{e}.linear_fc{i}.weight": w[e].detach()
                          for e in range(E) for i, w in ((1, theirs.gate_up_proj), (2, theirs.down_proj))})
    tokens = B * S * 3
    x = big_inputs(tokens, H)
    assert clamp_bites(torch.einsum("th,efh->tef", x, theirs.gate_up_proj))
    indices = torch.rand(tokens, E).topk(K, dim=-1).indices
    weights = torch.rand(tokens, K, requires_grad=True)
    expected = theirs(x, indices, weights)

    order = indices.reshape(-1).argsort(stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // K
    x2, w2 = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    out, _ = ours(x2[token_of], torch.bincount(indices.reshape(-1), minlength=E), w2.reshape(-1)[order])
    out = torch.zeros(tokens, H).index_add(0, token_of, out)
    assert max_diff(out, expected) <= TOL

    g = torch.randn_like(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert max_diff(x2.grad, x.grad) <= TOL and max_diff(w2.grad, weights.grad) <= TOL
    for e in range(E):
        assert max_diff(ours.local_experts[e].linear_fc1.weight.grad, theirs.gate_up_proj.grad[e]) <= TOL
        assert max_diff(ours.local_experts[e].linear_fc2.weight.grad, theirs.down_proj.grad[e]) <= TOL


def test_clamp_with_a_fused_activation_is_refused():
    import torch.nn.functional as F

    from dsv4cli.model.dsv4.experts import check_clamped_swiglu

    base = dict(activation_func_clamp_value=LIMIT, gated_linear_unit=True, activation_func=F.silu,
                glu_linear_offset=0.0, bias_activation_fusion=False, use_te_activation_func=False)
    check_clamped_swiglu(types.SimpleNamespace(**base))
    with pytest.raises(ValueError, match="bias_activation_fusion"):
        check_clamped_swiglu(types.SimpleNamespace(**{**base, "bias_activation_fusion": True}))
    with pytest.raises(ValueError, match="F.silu"):
        check_clamped_swiglu(types.SimpleNamespace(**{**base, "activation_func": F.gelu}))


# ---------------------------------------------------------------------------------------------
# the whole MoE block: megatron's MoELayer (alltoall dispatcher) with our router, vs HF's block
# ---------------------------------------------------------------------------------------------
def load_hf_block(ours, theirs, hash_routed: bool) -> None:
    sd = {"router.weight": theirs.gate.weight,
          "shared_experts.linear_fc1.weight": torch.cat([theirs.shared_experts.gate_proj.weight,
                                                         theirs.shared_experts.up_proj.weight]),
          "shared_experts.linear_fc2.weight": theirs.shared_experts.down_proj.weight}
    sd.update({f"experts.local_experts.{e}.linear_fc{i}.weight": w[e]
               for e in range(E) for i, w in ((1, theirs.experts.gate_up_proj), (2, theirs.experts.down_proj))})
    sd["router.tid2eid" if hash_routed else "router.expert_bias"] = (
        theirs.gate.tid2eid if hash_routed else theirs.gate.e_score_correction_bias)
    ours.load_state_dict({k: v.detach() for k, v in sd.items()})


def build_block(hash_routed: bool, **config_overrides):
    """Dsv4MoELayer from megatron's local MoE spec (SequentialMLP experts, alltoall dispatcher)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.spec_utils import build_module

    from dsv4cli.model.dsv4.moe import dsv4_moe_spec

    spec = dsv4_moe_spec(get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=E),
                         hash_routed=hash_routed, vocab_size=VOCAB)
    if isinstance(spec, functools.partial):  # megatron-core >= 0.19: the MoE spec is the constructor itself
        return spec(config=mcore_config(**config_overrides), layer_number=1)
    return build_module(spec, config=mcore_config(**config_overrides), layer_number=1)


@pytest.mark.parametrize("hash_routed", [False, True])
def test_moe_block_matches_hf(hash_routed):
    theirs = hf.DeepseekV4SparseMoeBlock(hf_config(), layer_idx=0 if hash_routed else 1)
    assert theirs.is_hash == hash_routed
    randomize(theirs)
    if hash_routed:
        theirs.gate.tid2eid.copy_(random_table())
    ours = build_block(hash_routed)
    load_hf_block(ours, theirs, hash_routed)

    x = big_inputs(B, S, H)
    ids = torch.randint(0, VOCAB, (B, S))
    expected = theirs(x, input_ids=ids)
    x_sb = to_sb(x)
    out, bias = ours(x_sb, token_ids=ids.t())
    assert bias is None and out.shape == (S, B, H)
    assert max_diff(out.transpose(0, 1), expected) <= TOL

    g = torch.randn_like(expected)
    (out.transpose(0, 1) * g).sum().backward()
    (expected * g).sum().backward()
    assert max_diff(x_sb.grad.transpose(0, 1), x.grad) <= TOL
    shared = theirs.shared_experts
    theirs_grads = {"router.weight": theirs.gate.weight.grad,
                    "shared_experts.linear_fc1.weight": torch.cat([shared.gate_proj.weight.grad, shared.up_proj.weight.grad]),
                    "shared_experts.linear_fc2.weight": shared.down_proj.weight.grad}
    theirs_grads.update({f"experts.local_experts.{e}.linear_fc{i}.weight": w.grad[e]
                         for e in range(E) for i, w in ((1, theirs.experts.gate_up_proj), (2, theirs.experts.down_proj))})
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(theirs_grads)
    for name, grad in theirs_grads.items():
        assert max_diff(ours_params[name].grad, grad) <= TOL, name


def test_moe_recompute_is_refused_on_hash_layers_only():
    """megatron's selective 'moe' recompute re-runs the router in backward, without the token ids."""
    recompute = dict(recompute_granularity="selective", recompute_modules=["moe"])
    assert build_block(False, **recompute).moe_layer_recompute
    with pytest.raises(ValueError, match="recompute"):
        build_block(True, **recompute)


def test_router_buffers_round_trip_through_torch_dist(tmp_path):
    """The expert bias and the hash table are saved and loaded with the model (torch_dist)."""
    from megatron.core import dist_checkpointing

    blocks = {"topk": build_block(False), "hash": build_block(True)}
    randomize(blocks["topk"].router)
    blocks["hash"].router.tid2eid.copy_(random_table())
    def sharded(bs):
        return {name: t for k, b in bs.items() for name, t in b.sharded_state_dict(prefix=f"{k}.").items()}

    dist_checkpointing.save(sharded(blocks), str(tmp_path))
    fresh = {"topk": build_block(False), "hash": build_block(True)}
    assert not torch.equal(fresh["hash"].router.tid2eid, blocks["hash"].router.tid2eid)
    loaded = dist_checkpointing.load(sharded(fresh), str(tmp_path))
    for k, block in fresh.items():
        block.load_state_dict({n.removeprefix(f"{k}."): t for n, t in loaded.items() if n.startswith(f"{k}.")})
    assert torch.equal(fresh["hash"].router.tid2eid, blocks["hash"].router.tid2eid)
    assert fresh["hash"].router.tid2eid.dtype == torch.int64
    assert torch.equal(fresh["topk"].router.expert_bias, blocks["topk"].router.expert_bias)
    assert torch.equal(fresh["topk"].router.weight, blocks["topk"].router.weight)
