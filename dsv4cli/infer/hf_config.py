"""A DeepSeek-V4 `config.json` (HF transformers' keys or the public release's legacy keys) -> a dsv4 Spec.

No torch import. Both styles are read (docs/interop.md):

    new (transformers 5.24 save_pretrained)     legacy (the public release)
    layer_types + compress_rates (per kind)     compress_ratios (per layer: 0, 4, 128)
    mlp_layer_types ("hash_moe" / "moe")        num_hash_layers
    rope_parameters {"main": .., "compress": ..} rope_theta, compress_rope_theta, rope_scaling (YaRN)
    partial_rotary_factor                       qk_rope_head_dim

The spec has every parallel size 1 and the MTP depth the caller counted in the tensors; the values
dsv4 cannot represent (another KV head count, biases, an attention factor other than 1, a hash
layer after a learned-routing layer, ...) raise HFConfigError naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

LAYER_KINDS = {
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
DEFAULT_HASH_LAYERS = 3
DEFAULT_ROPE_FRACTION = 64 / 512


class HFConfigError(ValueError):
    """A config.json dsv4 cannot turn into a spec (bad input: exit 2)."""


def read_json(path: Path) -> dict:
    """A JSON object from a file; HFConfigError naming the file when it is missing or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFConfigError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: expected a JSON object")
    return data


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _need(cfg: dict, key: str) -> Any:
    if cfg.get(key) is None:
        raise HFConfigError(f"config.json: {key} is missing")
    return cfg[key]


def _legacy_kind(ratio: int) -> str:
    """A legacy `compress_ratios` entry -> its kind. As in DeepSeek's reference, ratio 4 is the one
    with an indexer (csa), any other ratio > 0 compresses without one (hca), 0 is sliding-window only."""
    return "sliding" if ratio == 0 else "csa" if ratio == 4 else "hca"


def layer_schedule(cfg: dict, mtp_depth: int = 0) -> tuple[list[str], list[int]]:
    """-> (per-layer kinds 'sliding'/'csa'/'hca', per-layer compression ratios) of the decoder layers,
    then of the `mtp_depth` MTP layers (the config's entries past num_hidden_layers where it lists
    them, as the release's compress_ratios does; else the last decoder layer's)."""
    n = int(_need(cfg, "num_hidden_layers"))
    kinds, ratios = _decoder_schedule(cfg, n, n + mtp_depth)
    if len(kinds) < n:
        raise HFConfigError(f"config.json: {len(kinds)} attention layer types for num_hidden_layers = {n}")
    missing = n + mtp_depth - len(kinds)
    return kinds + kinds[n - 1:n] * missing, ratios + ratios[n - 1:n] * missing


def _decoder_schedule(cfg: dict, n: int, wanted: int) -> tuple[list[str], list[int]]:
    """The first `wanted` (at most) per-layer kinds and ratios the config lists (HF's default pattern
    for n layers when it lists none)."""
    if cfg.get("layer_types") is not None:
        rates = {**DEFAULT_COMPRESS_RATES, **_get(cfg, "compress_rates", {})}
        for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                             ("compress_rate_hca", "heavily_compressed_attention")):
            if cfg.get(legacy) is not None:
                rates[kind] = cfg[legacy]
        types = list(cfg["layer_types"])[:wanted]
        bad = [t for t in types if t not in LAYER_KINDS]
        if bad:
            raise HFConfigError(f"config.json: layer_types has unknown kinds {bad} (known: {list(LAYER_KINDS)})")
        kinds = [LAYER_KINDS[t] for t in types]
        ratios = [0 if k == "sliding" else int(rates[t]) for t, k in zip(types, kinds)]
    elif cfg.get("compress_ratios") is not None:
        ratios = [int(r) for r in cfg["compress_ratios"]][:wanted]  # the release lists its MTP layer's too
        bad = sorted({r for r in ratios if r < 0})
        if bad:
            raise HFConfigError(f"config.json: compress_ratios has {bad}; ratios are 0 (sliding) or positive")
        kinds = [_legacy_kind(r) for r in ratios]
    else:  # HF's default: two heavily compressed layers, then compressed sparse / heavily compressed in turn
        kinds = ["hca"] * min(n, 2) + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]
        ratios = [DEFAULT_COMPRESS_RATES[k] for k in
                  ("heavily_compressed_attention" if k == "hca" else "compressed_sparse_attention" for k in kinds)]
    return kinds, ratios


def hash_layers(cfg: dict) -> int:
    """Leading hash-routed MoE layers (mlp_layer_types, else num_hash_layers, else 3)."""
    n = int(_need(cfg, "num_hidden_layers"))
    if cfg.get("mlp_layer_types") is None:
        return min(n, int(_get(cfg, "num_hash_layers", DEFAULT_HASH_LAYERS)))
    types = list(cfg["mlp_layer_types"])[:n]
    bad = [t for t in types if t not in ("hash_moe", "moe")]
    if bad:
        raise HFConfigError(f"config.json: mlp_layer_types has unknown kinds {bad} (known: hash_moe, moe)")
    count = next((i for i, t in enumerate(types) if t != "hash_moe"), len(types))
    if "hash_moe" in types[count:]:
        raise HFConfigError("config.json: mlp_layer_types has a 'hash_moe' layer after a 'moe' layer; "
                            "dsv4 hash-routes the leading layers only (model.moe.hash_layers)")
    return count


def rope_settings(cfg: dict) -> dict:
    """-> {"rotary_base", "compress_rope_theta", "rope_head_dim", "yarn_*"} from either rope style."""
    head_dim = int(_get(cfg, "head_dim", 512))
    rp = _get(cfg, "rope_parameters", {})
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, compress = rp["main"], rp["compress"]
    else:
        flat = {k: v for k, v in (rp or _get(cfg, "rope_scaling", {})).items() if k not in ("main", "compress")}
        main = {"rope_theta": _get(cfg, "rope_theta", 10000.0)}
        compress = {**flat, "rope_theta": _get(cfg, "compress_rope_theta", 160000.0)}
    if cfg.get("qk_rope_head_dim") is not None:
        rope_dim = int(cfg["qk_rope_head_dim"])
    else:
        fraction = _get(cfg, "partial_rotary_factor", main.get("partial_rotary_factor", DEFAULT_ROPE_FRACTION))
        rope_dim = int(head_dim * fraction)
    out = {"rotary_base": float(_get(main, "rope_theta", 10000.0)),
           "compress_rope_theta": float(_get(compress, "rope_theta", 160000.0)), "rope_head_dim": rope_dim}
    for label, params in (("main", main), ("compress", compress)):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "yarn") or (label == "main" and kind != "default"):
            raise HFConfigError(f"config.json: rope type {kind!r} of the {label} RoPE is not supported "
                                "(main: default; compress: default or yarn)")
    if compress.get("rope_type", compress.get("type")) == "yarn":
        if float(_get(compress, "attention_factor", 1.0)) != 1.0:
            raise HFConfigError("config.json: YaRN attention_factor other than 1.0 is not supported "
                                "(DeepSeek-V4's RoPE is a pure rotation)")
        out.update(yarn_factor=float(_get(compress, "factor", 1.0)),
                   yarn_original_max_position=int(_get(compress, "original_max_position_embeddings", 65536)),
                   yarn_beta_fast=float(_get(compress, "beta_fast", 32.0)),
                   yarn_beta_slow=float(_get(compress, "beta_slow", 1.0)))
    return out


def eos_token_ids(cfg: dict, generation: Optional[dict] = None) -> list[int]:
    """The ids that end generation: generation_config.json's eos_token_id, else config.json's."""
    value = (generation or {}).get("eos_token_id", cfg.get("eos_token_id"))
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _check_supported(cfg: dict) -> None:
    checks = [("num_key_value_heads", 1), ("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")]
    for key, wanted in checks:
        if key in cfg and cfg[key] != wanted:
            raise HFConfigError(f"config.json: {key} = {cfg[key]!r} is not supported (DeepSeek-V4: {wanted!r})")
    if _get(cfg, "scoring_func", "sqrtsoftplus") not in ("softmax", "sigmoid", "sqrtsoftplus"):
        raise HFConfigError(f"config.json: scoring_func {cfg['scoring_func']!r} is not supported")


def default_seq_length(cfg: dict, kinds: list[str], ratios: list[int], topk: int) -> int:
    """4096, raised so that every compressed layer sees entries and the indexer has more than
    index_topk to choose from, capped at max_position_embeddings."""
    wanted = max([4096, *ratios] + [(topk + 1) * r for k, r in zip(kinds, ratios) if k == "csa"])
    return min(wanted, int(_get(cfg, "max_position_embeddings", wanted)))


def spec_data(cfg: dict, *, mtp_depth: int = 0, eos: Optional[list[int]] = None, name: str = "imported",
              tokenizer: str = "byte", checkpoint_dir: str = ".") -> dict:
    """config.json (dict) -> the spec's TOML tables (dict; Spec.model_validate takes it).
    `eos`: the ids that end generation (default: config.json's eos_token_id)."""
    _check_supported(cfg)
    kinds, ratios = layer_schedule(cfg, mtp_depth)
    rope = rope_settings(cfg)
    topk = int(_get(cfg, "index_topk", 512))
    rms_eps, hc_eps = float(_get(cfg, "rms_norm_eps", 1e-6)), float(_get(cfg, "hc_eps", 1e-6))
    expert_ffn = int(_get(cfg, "moe_intermediate_size", 2048))
    attention = {
        "layer_types": kinds,
        "compress_ratios": ratios,
        "head_dim": int(_get(cfg, "head_dim", 512)),
        "rope_head_dim": rope.pop("rope_head_dim"),
        "q_lora_rank": int(_get(cfg, "q_lora_rank", 1024)),
        "o_groups": int(_get(cfg, "o_groups", 8)),
        "o_lora_rank": int(_get(cfg, "o_lora_rank", 1024)),
        "sliding_window": int(_get(cfg, "sliding_window", 128)),
        "index_n_heads": int(_get(cfg, "index_n_heads", 64)),
        "index_head_dim": int(_get(cfg, "index_head_dim", 128)),
        "index_topk": topk,
        **{k: v for k, v in rope.items() if k != "rotary_base"},
    }
    return {
        "name": name,
        "model": {
            "num_layers": int(_need(cfg, "num_hidden_layers")),
            "hidden_size": int(_need(cfg, "hidden_size")),
            "num_attention_heads": int(_need(cfg, "num_attention_heads")),
            "ffn_hidden_size": expert_ffn,  # unused: every DeepSeek-V4 layer is MoE
            "vocab_size": int(_need(cfg, "vocab_size")),
            "seq_length": default_seq_length(cfg, kinds, ratios, topk),
            "norm_eps": rms_eps,
            "tie_embeddings": bool(_get(cfg, "tie_word_embeddings", False)),
            "rotary_base": rope["rotary_base"],
            "init_method_std": float(_get(cfg, "initializer_range", 0.02)),
            "mhc": {"streams": int(_get(cfg, "hc_mult", 4)),
                    "sinkhorn_iterations": int(_get(cfg, "hc_sinkhorn_iters", 20)), "eps": hc_eps},
            "contraction": {"mode": "learned", "eps": hc_eps},
            "mtp": {"depth": mtp_depth},
            "moe": {
                "num_experts": int(_get(cfg, "n_routed_experts", 256)),
                "top_k": int(_get(cfg, "num_experts_per_tok", 6)),
                "num_shared_experts": 1,  # HF's block always has one shared SwiGLU of moe_intermediate_size
                "expert_ffn_hidden_size": expert_ffn,
                "score_function": _get(cfg, "scoring_func", "sqrtsoftplus"),
                "routed_scaling_factor": float(_get(cfg, "routed_scaling_factor", 1.0)),
                "hash_layers": hash_layers(cfg),
                "swiglu_limit": float(_get(cfg, "swiglu_limit", 0.0)),
            },
            "attention": attention,
        },
        "data": {"source": "mock", "tokenizer": tokenizer,
                 "eos_token_ids": list(eos) if eos is not None else eos_token_ids(cfg)},
        "checkpoint": {"dir": checkpoint_dir},
    }


def notes_on(cfg: dict) -> list[str]:
    """What the spec cannot say exactly and the import reports (e.g. two eps where dsv4 has one)."""
    notes = []
    rms_eps, hc_eps = float(_get(cfg, "rms_norm_eps", 1e-6)), float(_get(cfg, "hc_eps", 1e-6))
    if rms_eps != hc_eps:
        notes.append(f"rms_norm_eps ({rms_eps}) differs from hc_eps ({hc_eps}): HF uses rms_norm_eps in the mHC's "
                     f"RMS factor, dsv4 uses model.mhc.eps = hc_eps for both")
    if int(_get(cfg, "n_shared_experts", 1)) != 1:
        notes.append(f"n_shared_experts = {cfg['n_shared_experts']}: HF builds one shared expert of "
                     "moe_intermediate_size regardless, and so does the imported model")
    return notes
