"""A dsv4 Spec -> the `config.json` (and `generation_config.json`) that transformers 5.24's
`DeepseekV4ForCausalLM.save_pretrained` writes: the inverse of hf_config.py (docs/interop.md).

No torch import. Every key that shapes the computation comes from the spec; the keys the spec does
not hold (`bos_token_id`, `max_position_embeddings`, `router_aux_loss_coef`, ...) come from the
source config kept with the checkpoint at import (`hf_config.json`), else from HF's defaults. The
keys and their order are those of transformers 5.24 (new style: `layer_types`, `mlp_layer_types`,
`compress_rates`, `rope_parameters` {"main", "compress"}). `export_config` adds the MTP depth, the
quantization_config of an fp8 export, and for `--layout original` the release's legacy keys
(`legacy_config`: `compress_ratios` per layer and MTP layer, `num_hash_layers`, `qk_rope_head_dim`,
`rope_scaling`, ...), which import-hf reads back to the same spec.
"""

from __future__ import annotations

from typing import Any, Optional

from dsv4cli.infer.hf_config import DEFAULT_COMPRESS_RATES, LAYER_KINDS, HFConfigError, _legacy_kind

TRANSFORMERS_VERSION = "5.24.0"
HF_KIND = {ours: theirs for theirs, ours in LAYER_KINDS.items()}
PASSED_THROUGH: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "max_position_embeddings": 1048576,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "output_router_logits": False,
    "pad_token_id": None,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "use_cache": True,
}
"""Keys the spec does not hold: the source config's value, else transformers' default."""
FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
"""config.json's quantization_config of an fp8 export (the release's fine-grained FP8, fp32 inverse scales)."""
NEW_STYLE_KEYS = ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor")
"""transformers' keys that the release's legacy keys replace."""


def _compress_rates(kinds: list[str], ratios: list[int]) -> dict[str, int]:
    """One ratio per compressed kind (HF cannot say per layer); HFConfigError when layers of a kind differ."""
    rates = dict(DEFAULT_COMPRESS_RATES)
    seen: dict[str, int] = {}
    for kind, ratio in zip(kinds, ratios):
        if kind == "sliding":
            continue
        if seen.setdefault(kind, ratio) != ratio:
            raise HFConfigError(f"the {kind} layers have different compression ratios ({seen[kind]}, {ratio}); "
                                "HF's config has one ratio per attention kind")
        rates[HF_KIND[kind]] = ratio
    return rates


def _rope_parameters(spec) -> dict:
    a = spec.model.attention
    fraction = a.rope_head_dim / a.head_dim
    compress: dict[str, Any] = {"partial_rotary_factor": fraction, "rope_theta": a.compress_rope_theta,
                                "rope_type": "default"}
    if a.yarn_factor != 1.0:
        compress = {"attention_factor": 1.0, "beta_fast": a.yarn_beta_fast, "beta_slow": a.yarn_beta_slow,
                    "factor": a.yarn_factor, "original_max_position_embeddings": a.yarn_original_max_position,
                    **compress, "rope_type": "yarn"}
    return {"compress": compress,
            "main": {"partial_rotary_factor": fraction, "rope_theta": spec.model.rotary_base, "rope_type": "default"}}


def _ids(ids: list[int]) -> Any:
    return ids[0] if len(ids) == 1 else list(ids)


def config_from_spec(spec, dtype: str, source: Optional[dict] = None) -> dict:
    """-> config.json (dict, keys sorted as HF writes them) for the spec's main model.

    `dtype`: the torch dtype name of the exported weights ("float32", "bfloat16"); `source`: the
    config.json the checkpoint was imported from (its non-spec keys are kept). HFConfigError for a
    model HF cannot describe (no DeepSeek-V4 attention or MoE, per-layer ratios within a kind)."""
    m = spec.model
    if m.attention is None or m.moe is None:
        raise HFConfigError("the checkpoint's model is not a DeepSeek-V4 model (model.attention and model.moe needed)")
    a, moe, source = m.attention, m.moe, source or {}
    n = m.num_layers
    kinds, ratios = list(a.layer_types)[:n], a.ratios()[:n]
    eos = list(spec.data.eos_token_ids) if spec.data.eos_token_ids else None
    derived = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "attention_bias": False,
        "compress_rates": _compress_rates(kinds, ratios),
        "compress_rope_theta": a.compress_rope_theta,
        "dtype": dtype,
        "eos_token_id": _ids(eos) if eos else source.get("eos_token_id", 1),
        "hc_eps": m.mhc.eps,
        "hc_mult": m.mhc.streams,
        "hc_sinkhorn_iters": m.mhc.sinkhorn_iterations,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "hidden_size": m.hidden_size,
        "index_head_dim": a.index_head_dim,
        "index_n_heads": a.index_n_heads,
        "index_topk": a.index_topk,
        "initializer_range": m.init_method_std,
        "layer_types": [HF_KIND[k] for k in kinds],
        "mlp_bias": False,
        "mlp_layer_types": ["hash_moe"] * moe.hash_layers + ["moe"] * (n - moe.hash_layers),
        "model_type": "deepseek_v4",
        "moe_intermediate_size": moe.expert_ffn_hidden_size,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.num_shared_experts,
        "num_attention_heads": m.num_attention_heads,
        "num_experts_per_tok": moe.top_k,
        "num_hidden_layers": n,
        "num_key_value_heads": 1,
        "o_groups": a.o_groups,
        "o_lora_rank": a.o_lora_rank,
        "partial_rotary_factor": a.rope_head_dim / a.head_dim,
        "q_lora_rank": a.q_lora_rank,
        "qk_rope_head_dim": a.rope_head_dim,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": _rope_parameters(spec),
        "rope_theta": m.rotary_base,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "scoring_func": moe.score_function,
        "sliding_window": a.sliding_window,
        "swiglu_limit": moe.swiglu_limit,
        "tie_word_embeddings": m.tie_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": m.vocab_size,
    }
    kept = {k: source.get(k, default) for k, default in PASSED_THROUGH.items()}
    return dict(sorted({**kept, **derived}.items()))


def generation_config(config: dict) -> Optional[dict]:
    """generation_config.json as save_pretrained derives it from the config; None without an eos id."""
    if config.get("eos_token_id") is None:
        return None
    return {"_from_model_config": True, "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config["eos_token_id"], "output_attentions": False, "output_hidden_states": False,
            "transformers_version": TRANSFORMERS_VERSION, "use_cache": True}


def export_config(spec, dtype: str, source: Optional[dict] = None, layout: str = "hf",
                  quantization: Optional[dict] = None) -> dict:
    """config.json of an export: `config_from_spec`, with, when the model has MTP depths, their number
    (`num_nextn_predict_layers`) and their layers' kinds after the decoder's in `layer_types` (import-hf
    reads them there; transformers keeps the first num_hidden_layers); `quantization_config` when
    given; legacy keys for layout "original"."""
    config = config_from_spec(spec, dtype, source)
    depth = spec.model.mtp.depth
    if depth:  # the MTP layers' kinds follow the decoder's in layer_types, as compress_ratios lists them
        config["num_nextn_predict_layers"] = depth  # (transformers keeps the first num_hidden_layers)
        a = spec.model.attention
        kinds = list(a.layer_types)[: spec.model.num_layers + depth]
        config["compress_rates"] = _compress_rates(kinds, a.ratios()[: len(kinds)])
        config["layer_types"] = [HF_KIND[k] for k in kinds]
    if quantization is not None:
        config["quantization_config"] = quantization
    if layout == "original":
        config = legacy_config(config, spec)
    return dict(sorted(config.items()))


def legacy_config(config: dict, spec) -> dict:
    """transformers' config.json -> the release's keys: `compress_ratios` (one per layer, then one per
    MTP layer), `num_hash_layers`, `qk_rope_head_dim`, `compress_rope_theta`, `rope_scaling` (YaRN),
    `num_nextn_predict_layers`. HFConfigError when a layer's kind is not what its ratio says in the
    legacy keys (ratio 4: csa, other ratios: hca, 0: sliding)."""
    a, m = spec.model.attention, spec.model
    kinds, ratios = list(a.layer_types), list(a.ratios())
    wrong = next((i for i, (k, r) in enumerate(zip(kinds, ratios)) if _legacy_kind(r) != k), None)
    if wrong is not None:
        raise HFConfigError(f"layer {wrong} is {kinds[wrong]} with compression ratio {ratios[wrong]}: the legacy "
                            "compress_ratios say csa by ratio 4 only (use --layout hf)")
    out = {k: v for k, v in config.items() if k not in NEW_STYLE_KEYS}
    out.update(compress_ratios=ratios, num_hash_layers=m.moe.hash_layers, qk_rope_head_dim=a.rope_head_dim,
               compress_rope_theta=a.compress_rope_theta,
               num_nextn_predict_layers=m.mtp.depth)
    if a.yarn_factor != 1.0:
        out["rope_scaling"] = {"type": "yarn", "factor": a.yarn_factor, "beta_fast": a.yarn_beta_fast,
                               "beta_slow": a.yarn_beta_slow,
                               "original_max_position_embeddings": a.yarn_original_max_position}
    return out
