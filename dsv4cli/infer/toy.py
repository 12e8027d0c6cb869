"""Toy variants of real weights: `dsv4 import-hf SRC OUT --layers K --experts E` (docs/interop.md).

Keeps the first K decoder layers (and every MTP depth) and the first E routed experts of every MoE
layer; no torch import (headers only):

    config.json     num_hidden_layers K, n_routed_experts E, num_experts_per_tok min(k, E); the
                    per-layer lists keep the first K entries and the MTP layers' entries past the old
                    num_hidden_layers (compress_ratios, layer_types); num_hash_layers min(., K)
    layers.i.*      dropped for i >= K
    *.ffn.experts.e.*   dropped for e >= E
    *.ffn.gate.weight [E_all, h], *.ffn.gate.bias [E_all]   first E rows (SourceTensor.rows)
    *.ffn.gate.tid2eid [V, k]   expert ids taken modulo E (SourceTensor.modulo): hash routing stays
                    a fixed token -> expert table, not the original one
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

from dsv4cli.infer.hf_names import strip_prefix
from dsv4cli.infer.safetensors_io import SourceTensor

_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"(^|\.)ffn\.experts\.(\d+)\.")


class ToyError(ValueError):
    """--layers / --experts out of range for the source model (exit 2)."""


def _first(values, k: int, n: int) -> list:
    """The first k entries of a per-layer list and its entries past n (the MTP layers')."""
    values = list(values)
    return values[:k] + values[n:]


def cut_config(cfg: dict, layers: Optional[int], experts: Optional[int]) -> tuple[dict, list[str]]:
    """config.json of the toy variant, and the notes saying what was cut."""
    n = int(cfg.get("num_hidden_layers") or 0)
    total = int(cfg.get("n_routed_experts") or 256)
    top_k = int(cfg.get("num_experts_per_tok") or 6)
    k = n if layers is None else layers
    e = total if experts is None else experts
    if not 1 <= k <= n:
        raise ToyError(f"--layers {k}: the source model has {n} layers")
    if not 1 <= e <= total:
        raise ToyError(f"--experts {e}: the source model has {total} routed experts")
    out = {**cfg, "num_hidden_layers": k, "n_routed_experts": e, "num_experts_per_tok": min(top_k, e)}
    for key in ("layer_types", "compress_ratios"):
        if cfg.get(key) is not None:
            out[key] = _first(cfg[key], k, n)
    if cfg.get("mlp_layer_types") is not None:
        out["mlp_layer_types"] = list(cfg["mlp_layer_types"])[:k]
    if cfg.get("num_hash_layers") is not None:
        out["num_hash_layers"] = min(int(cfg["num_hash_layers"]), k)
    notes = [f"toy variant: the first {k} of {n} layers (and every MTP depth), the first {e} of {total} routed "
             f"experts of every MoE layer (router rows cut to match; top_k {out['num_experts_per_tok']}; "
             f"hash-table expert ids taken modulo {e})"]
    return out, notes


def cut_sources(sources: dict[str, SourceTensor], layers: int, experts: int) -> dict[str, SourceTensor]:
    """The source tensors of the toy variant (headers only; `rows` / `modulo` applied while streaming)."""
    out = {}
    for name, source in sources.items():
        short = strip_prefix(name)
        layer, expert = _LAYER.match(short), _EXPERT.search(short)
        if (layer and int(layer.group(1)) >= layers) or (expert and int(expert.group(2)) >= experts):
            continue
        if short.endswith(("ffn.gate.weight", "ffn.gate.bias")) and source.shape[0] > experts:
            source = replace(source, shape=(experts, *source.shape[1:]), rows=experts)
        elif short.endswith("ffn.gate.tid2eid"):
            source = replace(source, modulo=experts)
        out[name] = source
    return out
