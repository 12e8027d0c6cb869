"""Does a checkpoint hold exactly the tensors its spec's model has? (docs/design.md §2.5, spec inventory)

The spec's `param_inventory` names parameters per layer (`decoder.layers.{i}.…`, experts as
`mlp.experts.local_experts.{e}.…`). Megatron stores homogeneous layers stacked
(`decoder.layers.…` with a leading layer dim, experts as `mlp.experts.experts.…` with a
leading expert dim) and keeps the TE-era names of fused norms
(`self_attention.linear_qkv.layer_norm_weight` for `input_layernorm.weight`,
`mlp.linear_fc1.layer_norm_weight` for `pre_mlp_layernorm.weight`). Stored names are unstacked
into that per-layer form to compare, and problems are reported folded back to stored names.

Training and eval check twice more before they load (conformance of a live model):

    check_model_spec(iter_dir, spec)    the saved dsv4_spec.toml's [model] equals the spec's
    check_tensors(iter_dir, expected)   the built model's tensors {stored key: shape} equal the stored ones
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.keys import contraction_blocks, hc_head_keys, infer_stream_layout, is_optimizer_key
from dsv4cli.ckpt.layout import META_FILE, SPEC_FILE, resolve_checkpoint
from dsv4cli.ckpt.metadata import CheckpointInfo, TensorEntry, stored_tensors
from dsv4cli.ckpt.summary import SEE_ALL, KeyProblem, convert_command, legacy_hint, summarize

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
        problems.append(Problem("spec", SPEC_FILE, info.spec_error))
    if info.meta_error:
        problems.append(Problem("meta", META_FILE, info.meta_error))
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
    from dsv4cli.build.dsv4_specs import buffer_inventory
    from dsv4cli.spec.estimate import param_inventory

    expected = {_alias(n): tuple(s) for n, s in [*param_inventory(spec), *buffer_inventory(spec)]}
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


# --------------------------------------------------------------------------- a live model (train, eval)


def model_spec_differences(saved_toml: str, spec) -> list[str]:
    """Dotted `model.*` keys whose value differs between a saved spec and `spec` ("key: old -> new")."""
    from dsv4cli.spec.schema import ModelSpec, dotted

    saved = tomllib.loads(saved_toml).get("model", {})
    try:
        saved = ModelSpec.model_validate(saved).model_dump(mode="json")
    except Exception:
        pass  # compare raw values when the saved section no longer validates
    a, b = dotted(saved, "model"), dotted(spec.model.model_dump(mode="json"), "model")
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def check_model_spec(iter_dir: Path, spec) -> None:
    """Refuse a checkpoint whose saved [model] differs from the spec's (CheckpointError)."""
    f = Path(iter_dir) / SPEC_FILE
    if not f.is_file():
        return
    diffs = model_spec_differences(f.read_text(), spec)
    if diffs:
        keys = f"{len(diffs)} key" + ("s" if len(diffs) != 1 else "")
        fresh = "--set checkpoint.dir=NEW_DIR" + (" without checkpoint.load" if spec.checkpoint.load else "")
        raise CheckpointError(
            f"{iter_dir}: the checkpoint's model differs from the spec ({keys}): " + "; ".join(diffs)
            + f". To train this model from scratch, use a new run directory ({fresh}); "
            f"to continue the checkpoint, use the spec it was saved with ({f})"
        )


def model_tensor_shapes(sharded_sd: dict) -> dict[str, tuple[int, ...]]:
    """Sharded state dict (consumed: factories are applied) -> {stored key: global shape}."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_sd)  # e.g. SwiGLU's fc1 factory -> its stored tensors
    return {v.key: tuple(v.global_shape) for v in nested_values(sharded_sd) if isinstance(v, ShardedTensor)}


def expected_shapes(chunks) -> dict[str, tuple[int, ...]]:
    """Collective: the whole model's {stored key: global shape} (each pipeline rank holds only its
    own layers: the union over ranks)."""
    import torch.distributed as dist

    shapes = {}
    for c in chunks:
        shapes.update(model_tensor_shapes(c.sharded_state_dict()))
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, shapes)
        for g in gathered:
            shapes.update(g)
    return shapes


def tensor_problems(iter_dir: Path, expected: dict[str, tuple[int, ...]]) -> list[KeyProblem]:
    """The model's tensors vs the checkpoint's model tensors -> [KeyProblem] (empty = they match)."""
    stored = {k: v for k, v in stored_tensors(iter_dir).items() if not is_optimizer_key(k)}
    problems = [KeyProblem.of("missing", k, str(list(expected[k]))) for k in sorted(set(expected) - set(stored))]
    problems += [KeyProblem.of("unexpected", k, str(list(stored[k]))) for k in sorted(set(stored) - set(expected))]
    problems += [KeyProblem.of("mis-shaped", k, f"checkpoint {list(stored[k])}, model {list(expected[k])}")
                 for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
    return problems


def tensor_mismatches(iter_dir: Path, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Compare the model's tensors with the checkpoint's; -> problem lines (empty = matches)."""
    return [str(p) for p in tensor_problems(iter_dir, expected)]


def check_tensors(iter_dir: Path, expected: dict[str, tuple[int, ...]], verbose: Optional[bool] = None) -> None:
    """CheckpointError with a summary (counts, first few, legacy hint) unless the tensors match.

    `verbose` lists every key (None: whether `--verbose` is in effect, dsv4cli.noise)."""
    from dsv4cli.noise import verbose_requested

    if verbose is None:
        verbose = verbose_requested()
    problems = tensor_problems(iter_dir, expected)
    if problems:
        loc = resolve_checkpoint(iter_dir)
        hint = legacy_hint(problems, loc.root or loc.iter_dir)
        raise CheckpointError(f"{iter_dir}: checkpoint tensors do not match the spec: "
                              + summarize(problems, verbose=verbose, hints=[hint] if hint else []))
