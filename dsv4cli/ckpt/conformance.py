"""Does a checkpoint hold exactly the tensors its spec's model has? (DESIGN.md §2.5, spec inventory)

The spec's `param_inventory` names parameters per layer (`decoder.layers.{i}.…`, experts as
`mlp.experts.local_experts.{e}.…`). Megatron stores homogeneous layers stacked
(`decoder.layers.…` with a leading layer dim, experts as `mlp.experts.experts.…` with a
leading expert dim) and keeps the TE-era names of fused norms
(`self_attention.linear_qkv.layer_norm_weight` for `input_layernorm.weight`,
`mlp.linear_fc1.layer_norm_weight` for `pre_mlp_layernorm.weight`). Stored names are unstacked
into that per-layer form to compare, and problems are reported folded back to stored names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from dsv4cli.ckpt.keys import contraction_blocks, hc_head_keys, infer_stream_layout
from dsv4cli.ckpt.metadata import CheckpointInfo, TensorEntry
from dsv4cli.ckpt.summary import SEE_ALL, KeyProblem, convert_command, summarize

_STACKED_LAYERS = re.compile(r"^(decoder\.layers\.)(?!\d+\.)")
_STACKED_EXPERTS = ".mlp.experts.experts."
_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_FOLD = [(re.compile(r"(decoder\.layers\.)\d+\."), r"\1"), (re.compile(r"\.mlp\.experts\.local_experts\.\d+\."), _STACKED_EXPERTS)]


BLOCKING = ("missing", "unexpected", "mis-shaped", "corrupt")


@dataclass(frozen=True)
class Problem:
    kind: str  # missing | unexpected | mis-shaped | legacy | corrupt | spec | meta
    name: str
    message: str


@dataclass
class Conformance:
    """Result of comparing a checkpoint with a spec; `conformant` is None when no spec is known."""

    conformant: Optional[bool]
    spec_source: Optional[str]
    problems: list[Problem] = field(default_factory=list)
    legacy: bool = False
    fix_command: Optional[str] = None

    def blocking(self) -> list[Problem]:
        """The problems that make the checkpoint unusable with the spec (not the legacy flag, spec or meta notes)."""
        return [p for p in self.problems if p.kind in BLOCKING]

    def summary(self, verbose: bool = False, see_all: str = SEE_ALL) -> str:
        """The blocking problems in one line (counts, first few, how to see all), with the legacy fix."""
        hints = [p.message for p in self.problems if p.kind == "legacy"]
        return summarize([KeyProblem(p.kind, p.name, p.message) for p in self.blocking()], verbose=verbose,
                         see_all=see_all, hints=hints)


def _alias(name: str) -> str:
    for stored, canon in _NORM_ALIASES.items():
        if name.endswith("." + stored):
            return name[: -len(stored)] + canon
    return name


def canonical_tensors(model: dict[str, TensorEntry]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Stored model tensors -> {per-layer inventory-style name: (shape, stored name)}."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}

    def add_experts(name: str, shape: tuple[int, ...], stored: str) -> None:
        if _STACKED_EXPERTS in name and shape:
            head, tail = name.split(_STACKED_EXPERTS, 1)
            for e in range(shape[0]):
                out[_alias(f"{head}.mlp.experts.local_experts.{e}.{tail}")] = (shape[1:], stored)
        else:
            out[_alias(name)] = (shape, stored)

    for stored, entry in model.items():
        shape = entry.shape
        m = _STACKED_LAYERS.match(stored)
        if m and shape:
            rest = stored[m.end():]
            for i in range(shape[0]):
                add_experts(f"decoder.layers.{i}.{rest}", shape[1:], stored)
        else:
            add_experts(stored, shape, stored)
    return out


def fold_name(name: str) -> str:
    """Per-layer inventory name -> the stacked name Megatron stores it under."""
    for pat, rep in _FOLD:
        name = pat.sub(rep, name)
    return name


def stored_name(name: str, stack_layers: bool = True, moe: bool = False) -> str:
    """Per-layer inventory name -> Megatron's stored key (stacked, TE-era fused-norm names).

    stack_layers=False gives the per-layer form Megatron uses for heterogeneous layers. With
    moe=True the MLP is a MoE layer, which has no linear_fc1 to fuse its norm into: the norm
    stays `pre_mlp_layernorm.weight` (the attention norm is still fused into linear_qkv).
    """
    name = fold_name(name) if stack_layers else _FOLD[1][0].sub(_FOLD[1][1], name)
    for stored, canon in _NORM_ALIASES.items():
        if moe and canon == "pre_mlp_layernorm.weight":
            continue
        if name.endswith("." + canon):
            return name[: -len(canon)] + stored
    return name


def legacy_fix_command(info: CheckpointInfo) -> str:
    return convert_command(info.location.root or info.iter_dir)


def detect_legacy(info: CheckpointInfo) -> list[str]:
    """Contraction blocks of a hyper-connection checkpoint that lack every hc_head_* tensor."""
    shapes = {k: v.shape for k, v in info.model_tensors().items()}
    try:
        layout = infer_stream_layout(shapes)
    except Exception:
        layout = None
    if layout is None:
        return []
    return [b for b in contraction_blocks(shapes) if not any(k in shapes for k in hc_head_keys(b))]


def check_conformance(info: CheckpointInfo, spec: Any = None, spec_source: Optional[str] = None) -> Conformance:
    """Missing, unexpected and mis-shaped tensors vs the spec's inventory, plus the legacy flag."""
    problems: list[Problem] = [Problem("corrupt", "", p) for p in info.integrity_problems]
    if info.spec_error and spec is None:
        problems.append(Problem("spec", "dsv4_spec.toml", info.spec_error))
    if info.meta_error:
        problems.append(Problem("meta", "dsv4_meta.json", info.meta_error))
    legacy_blocks = detect_legacy(info)
    result = Conformance(conformant=None, spec_source=spec_source)
    if legacy_blocks:
        result.legacy = True
        result.fix_command = legacy_fix_command(info)
        names = ", ".join(b + "hc_head_*" for b in legacy_blocks)
        problems.append(
            Problem("legacy", legacy_blocks[0] + "hc_head_fn",
                    f"hyper-connection checkpoint without {names} (legacy averaging contraction); "
                    f"fix: {result.fix_command}")
        )
    if spec is not None:
        problems += _inventory_problems(info, spec)
    result.problems = problems
    if spec is not None or info.integrity_problems:
        result.conformant = not result.blocking()
    return result


def _inventory_problems(info: CheckpointInfo, spec: Any) -> list[Problem]:
    from dsv4cli.spec.estimate import param_inventory

    expected = {_alias(n): tuple(s) for n, s in param_inventory(spec)}
    stored = canonical_tensors(info.model_tensors())
    grouped: dict[tuple[str, str], list[str]] = {}
    details: dict[tuple[str, str], str] = {}

    def note(kind: str, canon: str, stored_name: str, detail: str) -> None:
        key = (kind, stored_name)
        grouped.setdefault(key, []).append(canon)
        details.setdefault(key, detail)

    for name in expected.keys() - stored.keys():
        note("missing", name, fold_name(name), f"expected shape {list(expected[name])} per layer/tensor")
    for name in stored.keys() - expected.keys():
        shape, sname = stored[name]
        note("unexpected", name, sname, f"stored shape {list(info.tensors[sname].shape)}")
    for name in stored.keys() & expected.keys():
        shape, sname = stored[name]
        if tuple(shape) != expected[name]:
            note("mis-shaped", name, sname,
                 f"stored {list(info.tensors[sname].shape)}, spec expects {list(expected[name])} per entry")
    problems = []
    for (kind, sname), canon in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        where = f" ({len(canon)} entries, e.g. {sorted(canon)[0]})" if len(canon) > 1 else ""
        problems.append(Problem(kind, sname, f"{kind}: {sname}: {details[(kind, sname)]}{where}"))
    return problems
