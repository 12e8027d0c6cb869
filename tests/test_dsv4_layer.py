"""A whole DeepSeek-V4 decoder layer built from a spec (mHC + Dsv4Attention + Dsv4MoELayer) equals HF
transformers' `DeepseekV4DecoderLayer` with the same weights: fp32 on CPU, forward and the gradients
of the input and of every weight within 1e-5, for a hash-routed sliding-window layer, a compressed
sparse layer and a heavily compressed layer. Every HF parameter and buffer (including those HF
initialises to zero or a constant: sinks, position biases, the expert bias, the hash table, the mHC
base and scales, norm weights) is random first, so a weight we ignore or misplace fails."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

pytestmark = pytest.mark.usefixtures("megatron_1proc")

SEQ, BATCH, HIDDEN, STREAMS, VOCAB, EXPERTS = 40, 2, 64, 4, 256, 4
TOL = 1e-5
LAYER_TYPES = ["sliding", "csa", "hca"]
RATIOS = [0, 4, 16]
HF_KIND = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
ATTENTION = dict(layer_types=LAYER_TYPES, compress_ratios=RATIOS, head_dim=32, rope_head_dim=8, q_lora_rank=24,
                 o_groups=2, o_lora_rank=16, sliding_window=8, index_n_heads=4, index_head_dim=16, index_topk=3,
                 compress_rope_theta=160000.0, yarn_factor=16.0, yarn_original_max_position=65536)
MOE = dict(num_experts=EXPERTS, top_k=2, expert_ffn_hidden_size=16, num_shared_experts=1,
           score_function="sqrtsoftplus", routed_scaling_factor=1.5, hash_layers=1, swiglu_limit=0.5)


def dsv4_spec():
    from dsv4cli.spec.schema import Spec

    return Spec(**{
        "model": {"num_layers": 3, "hidden_size": HIDDEN, "num_attention_heads": 4, "ffn_hidden_size": 64,
                  "vocab_size": VOCAB, "seq_length": SEQ, "rotary_base": 10000.0,
                  "mhc": {"streams": STREAMS}, "mtp": {"depth": 0}, "attention": ATTENTION, "moe": MOE},
        "train": {"micro_batch_size": BATCH, "global_batch_size": BATCH},
    })


def hf_config() -> DeepseekV4Config:
    a, m = ATTENTION, MOE
    config = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_hidden_layers=3,
        layer_types=[HF_KIND[t] for t in LAYER_TYPES], mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={HF_KIND["csa"]: RATIOS[1], HF_KIND["hca"]: RATIOS[2]},
        head_dim=a["head_dim"], qk_rope_head_dim=a["rope_head_dim"], q_lora_rank=a["q_lora_rank"],
        o_groups=a["o_groups"], o_lora_rank=a["o_lora_rank"], sliding_window=a["sliding_window"],
        index_n_heads=a["index_n_heads"], index_head_dim=a["index_head_dim"], index_topk=a["index_topk"],
        rope_theta=10000.0, compress_rope_theta=a["compress_rope_theta"],
        rope_parameters={"rope_type": "yarn", "factor": a["yarn_factor"], "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": a["yarn_original_max_position"]},
        n_routed_experts=m["num_experts"], num_experts_per_tok=m["top_k"], moe_intermediate_size=m["expert_ffn_hidden_size"],
        n_shared_experts=1, routed_scaling_factor=m["routed_scaling_factor"], swiglu_limit=m["swiglu_limit"],
        hc_mult=STREAMS, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    )
    config._attn_implementation = "eager"
    return config


def randomise(layer: torch.nn.Module, gen: torch.Generator) -> None:
    """Parameters: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.3^2), the rest ~ N(0, 1); the
    router's buffers: expert bias ~ N(0, 1), hash table `top_k` distinct random experts per token
    (the rotary tables, also buffers, are HF's computation and stay)."""
    router_buffers = [(n, t) for n, t in layer.named_buffers() if n.endswith(("e_score_correction_bias", "tid2eid"))]
    with torch.no_grad():
        for name, t in [*layer.named_parameters(), *router_buffers]:
            if name.endswith("tid2eid"):
                t.copy_(torch.rand(t.shape[0], EXPERTS, generator=gen).topk(t.shape[1], dim=-1).indices)
            elif t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
                if name.endswith("norm.weight"):
                    t.copy_(1 + 0.3 * noise)
                elif t.dim() >= 2:
                    t.copy_(noise * t.shape[-1] ** -0.5)
                else:
                    t.copy_(noise)


def name_map(layer, index: int) -> dict[str, object]:
    """ours -> a function of HF's layer giving the same tensor (experts: slices of HF's stacked weights)."""
    from dsv4cli.model.dsv4.attention import tensor_names

    def attr(path):
        def get(m):
            for part in path.split("."):
                m = getattr(m, part)
            return m
        return get

    names = {f"self_attention.{k}": attr(f"self_attn.{hf_name}")
             for k, (_, hf_name) in tensor_names(layer.self_attention.settings).items()}
    names.update({"input_layernorm.weight": attr("input_layernorm.weight"),
                  "pre_mlp_layernorm.weight": attr("post_attention_layernorm.weight"),
                  "mlp.router.weight": attr("mlp.gate.weight"),
                  "mlp.shared_experts.linear_fc1.weight": lambda m: torch.cat(
                      [m.mlp.shared_experts.gate_proj.weight, m.mlp.shared_experts.up_proj.weight]),
                  "mlp.shared_experts.linear_fc2.weight": attr("mlp.shared_experts.down_proj.weight")})
    for e in range(EXPERTS):
        names[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = lambda m, e=e: m.mlp.experts.gate_up_proj[e]
        names[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = lambda m, e=e: m.mlp.experts.down_proj[e]
    for ours, theirs in (("self_attention_hyper_connection", "attn_hc"), ("mlp_hyper_connection", "ffn_hc")):
        names[f"{ours}.mapping_proj.weight"] = attr(f"{theirs}.fn")
        names[f"{ours}.bias"] = attr(f"{theirs}.base")
        for i, part in enumerate(("pre", "post", "res")):
            names[f"{ours}.alpha_{part}"] = lambda m, t=theirs, i=i: getattr(m, t).scale[i:i + 1]
    return names


def buffers_map(index: int) -> dict[str, object]:
    if index < MOE["hash_layers"]:
        return {"mlp.router.tid2eid": lambda m: m.mlp.gate.tid2eid}
    return {"mlp.router.expert_bias": lambda m: m.mlp.gate.e_score_correction_bias}


class _GradView:
    """HF's module tree with every parameter replaced by its gradient (so the name map slices grads)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Parameter):
            return value.grad
        if isinstance(value, torch.nn.Module):
            return _GradView(value)
        return value


def max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


@pytest.mark.parametrize("index", [0, 1, 2], ids=["sliding+hash", "csa", "hca"])
def test_decoder_layer_with_mhc_matches_hf(index):
    from megatron.core import tensor_parallel

    from dsv4cli.build import build_model

    tensor_parallel.model_parallel_cuda_manual_seed(3)
    torch.manual_seed(3)
    model = build_model(dsv4_spec())
    ours = model.decoder.layers[index]
    assert ours.needs_token_ids == (index == 0)
    config, gen = hf_config(), torch.Generator().manual_seed(10 + index)
    theirs = hf.DeepseekV4DecoderLayer(config, layer_idx=index)
    randomise(theirs, gen)
    names, buffers = name_map(ours, index), buffers_map(index)
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    assert set(state) == set(names) | set(buffers), (set(state) ^ (set(names) | set(buffers)))
    with torch.no_grad():
        for name, get in {**names, **buffers}.items():
            assert not torch.equal(state[name], get(theirs).to(state[name].dtype)), f"{name} equal before the copy"
        ours.load_state_dict({k: get(theirs).detach().clone() for k, get in {**names, **buffers}.items()}, strict=False)

    x = torch.randn(SEQ, BATCH, STREAMS * HIDDEN, generator=gen)
    x_ours = x.clone().requires_grad_()
    x_hf = x.view(SEQ, BATCH, STREAMS, HIDDEN).transpose(0, 1).clone().requires_grad_()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    rotary = hf.DeepseekV4RotaryEmbedding(config)
    embeddings = {kind: rotary(x_hf, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(config=config, inputs_embeds=x_hf[:, :, 0], attention_mask=None,
                                             cache=None, position_ids=pos)

    out, _ = ours(x_ours, attention_mask=None, token_ids=ids.t())
    out_hf = theirs(x_hf, input_ids=ids, position_embeddings=embeddings, position_ids=pos, attention_mask=mask)
    out_hf_sb = out_hf.transpose(0, 1).reshape(SEQ, BATCH, STREAMS * HIDDEN)
    assert max_diff(out, out_hf_sb) <= TOL, f"layer {index} output differs by {max_diff(out, out_hf_sb):.3e}"

    cotangent = torch.randn(out.shape, generator=gen) / (SEQ * BATCH)
    (out * cotangent).sum().backward()
    (out_hf_sb * cotangent).sum().backward()
    x_grad_hf = x_hf.grad.transpose(0, 1).reshape(SEQ, BATCH, STREAMS * HIDDEN)
    assert max_diff(x_ours.grad, x_grad_hf) <= TOL, "input gradient"
    params = dict(ours.named_parameters())
    assert set(params) == set(names)
    for name, get in names.items():
        theirs_grad = get(_GradView(theirs))
        if ".indexer." in name:  # the top-k choice is discrete: no gradient reaches the indexer, on either side
            assert theirs_grad is None and params[name].grad is None, name
            continue
        assert theirs_grad is not None and params[name].grad is not None, name
        assert max_diff(params[name].grad, theirs_grad) <= TOL, f"grad of {name}: {max_diff(params[name].grad, theirs_grad):.3e}"
