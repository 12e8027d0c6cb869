"""The one name table of `dsv4 import-hf`: a tensor of a DeepSeek-V4 safetensors directory -> where it
goes in dsv4's model (module / state-dict names; docs/interop.md lists every row).

Source names are DeepSeek's original ones in either of two layouts (`detect_layout`):
- "hf": what HF transformers writes on `save_pretrained` (it reverses its conversion mapping):
  `model.layers.3.attn.wq_a.weight`, `model.embed_tokens.weight`, `model.hc_head.hc_fn`, `head.weight`;
- "original": the public release: no `model.` prefix, `embed.weight`, `hc_head_fn`, `mtp.K.*`
  (MTP depth K+1: `MTP_TABLE`, and a whole decoder block under `mtp.K.`), quantized weights with a
  `.scale` / `.weight_scale_inv` companion (dsv4cli/infer/dequant.py);
- "hf-modules": the names of HF's in-memory modules (`model.layers.3.self_attn.q_a_proj.weight`,
  fused `mlp.experts.gate_up_proj` [E, 2I, h] / `down_proj` [E, h, I]), read through
  `HF_MODULE_RENAMES` (transformers' conversion mapping, reversed).

A `Placement` says which dsv4 tensor receives a source tensor and which part of it: the whole
tensor, its first rows (the embedding / output layer / hash table are padded to the padded
vocabulary; the padding rows stay zero), one half of a fused SwiGLU `linear_fc1` ([gate; up]
stacked by rows: w1 is the gate, w3 the up projection), or one element of a `[3]` mHC scale
(pre, post, res -> alpha_pre, alpha_post, alpha_res). Expert weights have two possible homes,
megatron's SequentialMLP (`local_experts.E.linear_fc1.weight`) and its grouped experts
(`linear_fc1.weightE`): the first one the model has is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MODEL_PREFIX = "model."


@dataclass(frozen=True)
class Placement:
    """Where one source tensor goes: `targets` (candidate dsv4 names, the first the model has),
    `part` ("all", "rows", "gate", "up") and `element` (take source[element], for split scales)."""

    targets: tuple[str, ...]
    part: str = "all"
    element: Optional[int] = None


def part_rows(part: str, rows: int, used: Optional[int] = None) -> tuple[int, int]:
    """The rows (start, count) of a dsv4 tensor with `rows` rows (first dimension) that a placement's
    `part` covers: "gate" the first half of a fused [gate; up] fc1, "up" the second half, "rows" the
    first `used` (a padded table's real rows, at most all of them), else all."""
    half = rows // 2
    if part == "gate":
        return 0, half
    if part == "up":
        return half, half
    if part == "rows" and used is not None:
        return 0, min(used, rows)
    return 0, rows


def _one(target: str, part: str = "all", element: Optional[int] = None) -> list[Placement]:
    return [Placement((target,), part, element)]


TOP_LEVEL: dict[str, list[Placement]] = {
    "embed_tokens.weight": _one("embedding.word_embeddings.weight", "rows"),
    "embed.weight": _one("embedding.word_embeddings.weight", "rows"),
    "head.weight": _one("output_layer.weight", "rows"),
    "lm_head.weight": _one("output_layer.weight", "rows"),
    "norm.weight": _one("decoder.final_layernorm.weight"),
    "hc_head.hc_fn": _one("decoder.hc_head_fn"),
    "hc_head.hc_base": _one("decoder.hc_head_base"),
    "hc_head.hc_scale": _one("decoder.hc_head_scale"),
    "hc_head_fn": _one("decoder.hc_head_fn"),
    "hc_head_base": _one("decoder.hc_head_base"),
    "hc_head_scale": _one("decoder.hc_head_scale"),
}
"""Tensors outside the layers: source name (after `model.`) -> placements."""

EXPORT_TOP = {
    "hf": ("embed_tokens.weight", "head.weight", "norm.weight", "hc_head.hc_fn", "hc_head.hc_base", "hc_head.hc_scale"),
    "original": ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"),
}
"""The spelling `dsv4 export-hf --layout L` writes for each top-level tensor (transformers' or the release's)."""
UNPREFIXED = ("head.weight", "lm_head.weight")
"""Names transformers writes without the `model.` prefix (its lm_head sits outside the model)."""


def _hyper_connection(ours: str) -> dict[str, list[Placement]]:
    return {
        "fn": _one(f"{ours}.mapping_proj.weight"),
        "base": _one(f"{ours}.bias"),
        "scale": [Placement((f"{ours}.alpha_{g}",), "all", i) for i, g in enumerate(("pre", "post", "res"))],
    }


def _swiglu(prefix: str, ours: list[str]) -> dict[str, list[Placement]]:
    """w1 (gate), w3 (up) -> halves of linear_fc1; w2 -> linear_fc2. `ours`: candidate homes, '{fc}' in each."""
    return {
        f"{prefix}w1.weight": [Placement(tuple(o.format(fc="linear_fc1") for o in ours), "gate")],
        f"{prefix}w3.weight": [Placement(tuple(o.format(fc="linear_fc1") for o in ours), "up")],
        f"{prefix}w2.weight": [Placement(tuple(o.format(fc="linear_fc2") for o in ours), "all")],
    }


def layer_table() -> dict[str, list[Placement]]:
    """Tensors of decoder layer i, except the routed experts: name under `layers.{i}.` -> placements
    under `decoder.layers.{i}.`."""
    from dsv4cli.model.dsv4.attention import ATTENTION_TENSOR_NAMES, COMPRESSED_TENSOR_NAMES, SPARSE_TENSOR_NAMES

    table = {
        "attn_norm.weight": _one("input_layernorm.weight"),
        "ffn_norm.weight": _one("pre_mlp_layernorm.weight"),
        "ffn.gate.weight": _one("mlp.router.weight"),
        "ffn.gate.bias": _one("mlp.router.expert_bias"),
        "ffn.gate.tid2eid": _one("mlp.router.tid2eid", "rows"),
        **_swiglu("ffn.shared_experts.", ["mlp.shared_experts.{fc}.weight"]),
    }
    for ds, ours in (("hc_attn_", "self_attention_hyper_connection"), ("hc_ffn_", "mlp_hyper_connection")):
        table.update({ds + k: v for k, v in _hyper_connection(ours).items()})
    for names in (ATTENTION_TENSOR_NAMES, COMPRESSED_TENSOR_NAMES, SPARSE_TENSOR_NAMES):
        table.update({f"attn.{ds}": _one(f"self_attention.{ours}") for ours, (ds, _hf) in names.items()})
    return table


MTP_TABLE: dict[str, list[Placement]] = {
    "e_proj.weight": _one("e_proj.weight"),
    "h_proj.weight": _one("h_proj.weight"),
    "enorm.weight": _one("enorm.weight"),
    "hnorm.weight": _one("hnorm.weight"),
    "norm.weight": _one("final_layernorm.weight"),
    "hc_head_fn": _one("hc_head_fn"),
    "hc_head_base": _one("hc_head_base"),
    "hc_head_scale": _one("hc_head_scale"),
}
"""The MTP depth's own tensors: name under `mtp.{k}.` -> placements under `mtp.layers.{k}.`. Every
other `mtp.{k}.` tensor is its transformer block's, named as in a decoder layer (`layer_table`), and
goes under `mtp.layers.{k}.transformer_layer.`."""

HF_MODULE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.kv_norm\.", ".norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
)
"""HF in-memory module names -> DeepSeek's original ones (transformers' conversion_mapping.py
"deepseek_v4", reversed; applied in order). The fused experts (`ffn.experts.gate_up_proj` [E, 2I, h]:
w1 rows then w3 rows of every expert; `ffn.experts.down_proj` [E, h, I]) are split by `placements`."""

EXPERT_HOMES = ("mlp.experts.local_experts.{e}.{fc}.weight", "mlp.experts.{fc}.weight{e}")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123]\.weight)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
_FUSED = {"ffn.experts.gate_up_proj": "linear_fc1", "ffn.experts.down_proj": "linear_fc2"}
_HF_MODULE_MARKS = (".self_attn.", ".mlp.", ".attn_hc.", ".ffn_hc.")


def original_name(name: str) -> str:
    """An HF in-memory module name -> DeepSeek's original name (other names unchanged)."""
    for pattern, replacement in HF_MODULE_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def strip_prefix(name: str) -> str:
    return name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name


def mtp_index(name: str) -> Optional[int]:
    """The MTP layer a source tensor belongs to (`mtp.K.` / `model.mtp.K.`), else None."""
    m = _MTP.match(strip_prefix(name))
    return int(m.group(1)) if m else None


def _under(prefix: str, found: Optional[list[Placement]]) -> Optional[list[Placement]]:
    if found is None:
        return None
    return [Placement(tuple(prefix + t for t in p.targets), p.part, p.element) for p in found]


def _block(prefix: str, rest: str, layers: dict[str, list[Placement]],
           experts: Optional[int] = None) -> Optional[list[Placement]]:
    """A transformer block's tensor `rest` (`attn.wq_a.weight`, `ffn.experts.7.w1.weight`, ...) -> its
    placements under `prefix` (`decoder.layers.3.`, `mtp.layers.0.transformer_layer.`). A fused
    expert tensor [E, ...] places its element e in expert e's home (`experts`: E)."""
    if rest in _FUSED and experts is not None:
        return [Placement(tuple(prefix + h.format(e=e, fc=_FUSED[rest]) for h in EXPERT_HOMES), "all", e)
                for e in range(experts)]
    e = _EXPERT.match(rest)
    if e:
        homes = [prefix + h.replace("{e}", e.group(1)) for h in EXPERT_HOMES]
        return _swiglu("", homes)[e.group(2)]
    return _under(prefix, layers.get(rest))


def placements(name: str, layers: Optional[dict[str, list[Placement]]] = None,
               shape: Optional[tuple] = None) -> Optional[list[Placement]]:
    """Where source tensor `name` goes in dsv4's model; None for a name this table does not know.
    `layers`: layer_table() (passed in when called for many names); `shape`: the source's (fused
    experts are split along its first dimension). HF in-memory names are read too (original_name)."""
    short = original_name(strip_prefix(name))
    experts = shape[0] if shape else None
    if short in TOP_LEVEL:
        return TOP_LEVEL[short]
    layers = layers if layers is not None else layer_table()
    m = _LAYER.match(short)
    if m:
        return _block(f"decoder.layers.{m.group(1)}.", m.group(2), layers, experts)
    m = _MTP.match(short)
    if m:
        k, rest = m.group(1), m.group(2)
        if rest in MTP_TABLE:
            return _under(f"mtp.layers.{k}.", MTP_TABLE[rest])
        return _block(f"mtp.layers.{k}.transformer_layer.", rest, layers, experts)
    return None


def detect_layout(names) -> str:
    """"hf" (save_pretrained: `model.`-prefixed names, `head.weight`), "hf-modules" (HF's in-memory
    module names) or "original" (the release: no prefix). ValueError for a directory mixing the two (`mtp.*` may go without the prefix in either:
    transformers drops MTP tensors on load, with or without `model.`)."""
    unprefixed = [n for n in names if not n.startswith(MODEL_PREFIX) and n not in UNPREFIXED
                  and not n.startswith("mtp.")]
    prefixed = [n for n in names if n.startswith(MODEL_PREFIX)]
    if prefixed and unprefixed:
        raise ValueError(f"tensor names mix layouts: {prefixed[0]} (HF save_pretrained) and {unprefixed[0]} "
                         "(the original release)")
    if any(mark in n for n in names for mark in _HF_MODULE_MARKS):
        return "hf-modules"
    return "hf" if prefixed else "original"


def layout_name(short: str, layout: str) -> str:
    """A table name (`layers.3.attn.wq_a.weight`, `mtp.0.e_proj.weight`, `head.weight`) -> the name
    the layout stores: "hf" prefixes `model.` except the head and the MTP tensors (which transformers
    ignores on load, with or without the prefix), "original" stores it as is."""
    if layout == "original" or short in UNPREFIXED or short.startswith("mtp."):
        return short
    return MODEL_PREFIX + short


def export_names(num_layers: int, num_experts: int, mtp_depth: int, layout: str) -> list[str]:
    """Every table name (before `layout_name`) a model of this size may export, in order: the
    top-level tensors, each layer's (its experts' last), each MTP depth's."""
    table = layer_table()

    def block(prefix: str) -> list[str]:
        experts = [f"ffn.experts.{e}.{w}.weight" for e in range(num_experts) for w in ("w1", "w2", "w3")]
        return [prefix + k for k in [*table, *experts]]

    names = list(EXPORT_TOP[layout])
    for i in range(num_layers):
        names += block(f"layers.{i}.")
    for k in range(mtp_depth):
        names += [f"mtp.{k}.{n}" for n in MTP_TABLE] + block(f"mtp.{k}.")
    return names
