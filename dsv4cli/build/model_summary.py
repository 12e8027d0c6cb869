"""`dsv4 inspect model`: build the spec's model on CPU in a 1-process group and describe it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4cli.spec.schema import Spec


@dataclass
class ModelReport:
    """Module tree (folded), parameter list and totals of a built model."""

    tree: object  # dsv4cli.model.inventory.TreeNode
    params: list[tuple[str, tuple[int, ...]]]
    total: int
    by_group: dict[str, int]

    def by_module(self) -> list[tuple[str, int, dict[str, int]]]:
        """(top-level module, parameters below it, {"mhc": n, "contraction": n} of those): the module
        totals of the tree, with the mHC and contraction parameters each one holds."""
        out: dict[str, tuple[int, dict[str, int]]] = {}
        for name, shape in self.params:
            top, n = name.split(".")[0], math.prod(shape)
            total, parts = out.get(top, (0, {"mhc": 0, "contraction": 0}))
            if _group(name) in parts:
                parts[_group(name)] += n
            out[top] = (total + n, parts)
        return [(top, total, parts) for top, (total, parts) in out.items()]

    def to_json(self) -> dict:
        return {
            "total_params": self.total,
            "by_group": self.by_group,
            "by_module": {top: {"params": n, **parts} for top, n, parts in self.by_module()},
            "params": [{"name": n, "shape": list(s)} for n, s in self.params],
            "tree": self.tree.to_json(),
        }


def _group(name: str) -> str:
    if "hyper_connection" in name:
        return "mhc"
    if "hc_head_" in name:
        return "contraction"
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embedding.") or name.startswith("output_layer."):
        return "embedding+output"
    return "decoder"


def inspect_model(spec: Spec) -> ModelReport:
    """Build the full model (parallel sizes forced to 1, local modules, meta tensors) and report it.

    Raises UnsupportedSpecError for what the builder cannot build.
    """
    from dsv4cli.build.parallel import single_process
    from dsv4cli.model.inventory import module_tree, param_inventory

    with single_process(spec):
        model = meta_model(spec)
        params = param_inventory(model)
        tree = module_tree(model, "model")
    by_group: dict[str, int] = {}
    for name, shape in params:
        by_group[_group(name)] = by_group.get(_group(name), 0) + math.prod(shape)
    return ModelReport(tree, params, sum(by_group.values()), by_group)


def meta_model(spec: Spec):
    """The spec's whole model with meta tensors (parallel sizes forced to 1, vocabulary padded as
    under tp, local modules: SequentialMLP experts): names, shapes, dtypes and module types without
    memory, on any machine. Call inside `dsv4cli.build.parallel.single_process(spec)`."""
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from dsv4cli.build.config import transformer_config
    from dsv4cli.build.layer_specs import Backend
    from dsv4cli.build.model import build_model_from_config
    from dsv4cli.model.norms import SPNorm
    from dsv4cli.model.sdpa_attention import SDPACoreAttention
    from dsv4cli.spec.layout import single_process_spec

    flat = single_process_spec(spec)  # one process holds everything, vocabulary padded as under tp
    config = transformer_config(flat)
    config.use_cpu_initialization = True  # allocate with the default device: meta below
    config.param_device = None  # dsv4's own parameters too (on a GPU machine the builder says "cuda")
    config.perform_initialization = False
    local = Backend("local", SDPACoreAttention, SPNorm, ColumnParallelLinear)
    with torch.device("meta"):  # shapes only: a 300B-parameter spec needs no memory
        return build_model_from_config(flat, config, backend=local)
