"""Write a small checkpoint in Megatron's stored key layout straight from a spec's parameter inventory.

For tests and the docs' worked example: no model is built, no process group is needed (PyTorch
DCP single-process save). Decoder layers are stacked (`decoder.layers.<rest>` with a leading layer
dim) and routed experts stacked (`mlp.experts.experts.<rest>`), as Megatron stores them; optimizer
state is per parameter (`optimizer.state.{exp_avg,exp_avg_sq}.<key>`), as megatron's
non-distributed optimizer stores it. Fused-norm weights carry Megatron's stored names
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from dsv4cli.ckpt.conformance import stored_name
from dsv4cli.ckpt.layout import MEGATRON_CONFIG, META_FILE, SPEC_FILE, TRACKER_FILE, iter_dir_name


def stacked_inventory(spec, stack_layers: bool = True) -> dict[str, tuple[int, ...]]:
    """param_inventory in stored form: {stored key: global shape} (layers per layer if not stack_layers)."""
    from dsv4cli.spec.estimate import param_inventory

    counts: dict[str, list] = {}
    for name, shape in param_inventory(spec):
        stored = stored_name(name, stack_layers, moe=spec.model.moe is not None)
        counts.setdefault(stored, []).append(tuple(shape))
    out = {}
    for stored, shapes in counts.items():
        if not stack_layers and ".mlp.experts.experts." in stored:
            out[stored] = (len(shapes), *shapes[0])
        elif not stack_layers:
            out[stored] = shapes[0]
        elif stored.startswith("decoder.layers.") and ".mlp.experts.experts." in stored:
            layers = spec.model.num_layers
            out[stored] = (layers, len(shapes) // layers, *shapes[0])
        elif stored.startswith("decoder.layers."):
            out[stored] = (len(shapes), *shapes[0])
        elif ".mlp.experts.experts." in stored:
            out[stored] = (len(shapes), *shapes[0])
        else:
            out[stored] = shapes[0]
    return out


def write_synthetic_checkpoint(root: str | Path, spec, iteration: int = 10, optimizer: bool = True,
                               seed: int = 0, omit: tuple[str, ...] = (), stack_layers: bool = True,
                               chained: bool = False, states: tuple[str, ...] = ("exp_avg", "exp_avg_sq")) -> Path:
    """root/latest_checkpointed_iteration.txt + root/iter_XXXXXXX (DCP + metadata.json + common.pt + dsv4 files).

    chained: optimizer keys as megatron's ChainedOptimizer stores them (`chained_0.` dense, `chained_1.`
    routed experts); states: per-parameter states (`fp32_param` holds a copy of the parameter).
    """
    import torch
    import torch.distributed.checkpoint as dcp

    from dsv4cli.spec.load import spec_to_toml

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in stacked_inventory(spec, stack_layers).items():
        if any(name.endswith(o) or name == o for o in omit):
            continue
        state[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
    if optimizer:
        for name, t in list(state.items()):
            prefix = (f"chained_{int('.mlp.experts.' in name)}." if chained else "") + "optimizer.state."
            for st in states:
                if st == "fp32_param":
                    state[f"{prefix}{st}.{name}"] = t.clone()
                elif st == "exp_avg":
                    state[f"{prefix}{st}.{name}"] = torch.randn(t.shape, generator=gen) * 1e-3
                else:
                    state[f"{prefix}{st}.{name}"] = torch.rand(t.shape, generator=gen) * 1e-6
    root = Path(root)
    iter_dir = root / iter_dir_name(iteration)
    iter_dir.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(iter_dir)), no_dist=True)
    (iter_dir / MEGATRON_CONFIG).write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}))
    common = {"iteration": iteration}
    if optimizer:
        one = {"state": {"common_step": torch.tensor(float(iteration))},
               "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}]}
        common["optimizer"] = {0: one, 1: one} if chained else one
    torch.save(common, iter_dir / "common.pt")
    (iter_dir / SPEC_FILE).write_text(spec_to_toml(spec))
    (iter_dir / META_FILE).write_text(json.dumps({"format": "torch_dist", "iteration": iteration, "synthetic": True}))
    (root / TRACKER_FILE).write_text(str(iteration))
    return iter_dir
