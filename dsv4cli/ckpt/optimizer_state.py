"""How a checkpoint stores its optimizer state, and the entries convert-ckpt adds for new parameters.

Megatron's per-parameter formats (dsv4cli.ckpt.keys) can take new entries: a parameter the
conversion adds gets one entry per stored state under the same (possibly `chained_{i}.`) prefix
as its block's other mHC parameters. Moments (exp_avg, exp_avg_sq) start at zero; states that
hold the parameter itself (`fp32_param`, `param`: the fp32 main copy) start at its value.
Bucket-space formats (the distributed optimizer's `dp_reshardable` / `dp_zero_gather_scatter`)
and flattened model-space entries cannot take new entries without rebuilding their buckets.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.keys import OptimizerKey, is_optimizer_key, mapping_proj_keys, parse_optimizer_key
from dsv4cli.ckpt.metadata import CheckpointInfo
from dsv4cli.ckpt.new_entries import NewTensor

# Optimizer states that hold the parameter itself (main fp32 copy) rather than a moment.
PARAM_COPY_STATES = ("fp32_param", "param")
_DROP_HINT = "pass --drop-optimizer to write a model-only checkpoint"


@dataclass
class OptimizerLayout:
    """mode: 'none' | 'per-parameter' | 'dropped' | 'unchanged'; states: state name -> dtype to add;
    prefixes: block ('decoder.', 'mtp.layers.0.') -> key prefix of its optimizer ('' or 'chained_0.')."""

    mode: str
    states: dict[str, str] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)

    def key(self, block: str, state: str, param: str) -> str:
        return OptimizerKey(self.prefixes[block], state, param).name


def optimizer_layout(info: CheckpointInfo, blocks: list[str], drop: bool) -> OptimizerLayout:
    """How optimizer state is stored, and where entries for new parameters of `blocks` go.

    Raises CheckpointError (with the --drop-optimizer hint) when they cannot be added.
    """
    opt_tensors = info.optimizer_tensors()
    opt_objects = [o for o in info.objects if is_optimizer_key(o)]
    if not opt_tensors and not opt_objects:
        return OptimizerLayout("none")
    if drop:
        return OptimizerLayout("dropped")
    model = info.model_tensors()
    parsed = {n: parse_optimizer_key(n) for n in opt_tensors}
    not_per_param = list(opt_objects) + [n for n, k in parsed.items() if k is None or k.param not in model]
    flattened = [n for n, k in parsed.items() if k and k.param in model and opt_tensors[n].shape != model[k.param].shape]
    if flattened and not not_per_param:
        # The distributed optimizer's model-space format stores [.., numel] views with flattened ranges;
        # writing new entries in that layout is not verified, so stop rather than risk an unloadable file.
        raise CheckpointError(
            f"optimizer state is stored flattened (distributed optimizer, e.g. {flattened[0]} "
            f"{list(opt_tensors[flattened[0]].shape)}); adding entries in that layout is not supported; {_DROP_HINT}"
        )
    if not_per_param:
        raise CheckpointError(
            f"optimizer state is not stored per parameter (e.g. {not_per_param[0]}: the distributed optimizer's "
            f"bucket format), so entries for the new contraction parameters cannot be added; {_DROP_HINT}"
        )
    # Reference: the block's fp32 mHC parameters (like the new ones); their entries say which states
    # to add and under which prefix.
    refs = set(mapping_proj_keys(model))
    out = OptimizerLayout("per-parameter")
    for block in blocks:
        found = {(k.prefix, k.state, opt_tensors[n].dtype) for n, k in parsed.items()
                 if k.param in refs and k.param.startswith(block)}
        prefixes = {p for p, _, _ in found}
        if not found:
            raise CheckpointError(
                f"optimizer state is stored per parameter but has no entry for the mHC parameters of {block!r}; "
                + _DROP_HINT
            )
        if len(prefixes) > 1:
            raise CheckpointError(f"the mHC parameters of {block!r} have optimizer state under several prefixes "
                                  f"({sorted(prefixes)}); {_DROP_HINT}")
        out.prefixes[block] = prefixes.pop()
        for _, state, dtype in found:
            out.states.setdefault(state, dtype)
    return out


def new_optimizer_entries(layout: OptimizerLayout, params: dict) -> dict:
    """{optimizer key: NewTensor} for new parameters {key: float32 NewTensor} (keys start with their block)."""
    out = {}
    for state, dtype in sorted(layout.states.items()):
        for name, p in params.items():
            block = next(b for b in layout.prefixes if name.startswith(b))
            values = array("f", p.values) if state in PARAM_COPY_STATES else array("f", bytes(len(p.values) * 4))
            out[layout.key(block, state, name)] = NewTensor(p.shape, values, dtype)
    return out
