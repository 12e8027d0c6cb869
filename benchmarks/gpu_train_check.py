"""Training-level parts of benchmarks/gpu_check.py: a timed training step (n = 1 vs 4, MFU, mHC overhead)
and the checkpoint keys of TE grouped-GEMM experts vs SequentialMLP experts.

These need this project installed with its dependencies (megatron-core, pydantic, ...), unlike the
kernel checks; gpu_check.py reports them as skipped when the imports fail.

- `train_rows`: benchmarks/train.py's `measure` (the real training step: DDP + Adam +
  forward_backward_func, mock data, one process) for a mid-size spec (specs/model.toml cut to
  one GPU: 4 layers, h 2048, 32 experts top-4, seq 4096, bf16) with n = 1 and n = 4 streams; MFU
  from dsv4cli.spec.estimate.flops_per_token and the device's peak. Dry run: specs/tiny.toml at seq 32.
- `expert_key_rows`: a small MoE model built twice in one process, experts as TEGroupedMLP (grouped
  GEMM; needs TE) and as SequentialMLP; every sharded tensor's checkpoint key, global shape and
  global offset must agree (SwiGLU factories expanded), and so must the key of every module
  weight under dsv4cli.build.gpu_settings.expert_checkpoint_key. Without TE only the SequentialMLP
  side (the mapping) is checked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID = ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.ep=1", "model.num_layers=4",
       "train.micro_batch_size=2", "train.global_batch_size=2"]
DRY = ["model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=\"fp32\""]


def _train_module():
    spec = importlib.util.spec_from_file_location("dsv4_bench_train", Path(__file__).with_name("train.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def train_rows(dry_run: bool, log) -> list[dict]:
    """Timed training steps for n = 1 and n = 4 -> rows (step time, tokens/s, MFU, ratio vs n = 1)."""
    from dsv4cli.spec.estimate import flops_per_token
    from dsv4cli.spec.load import load_spec
    from dsv4cli.train.metrics import mfu

    bench = _train_module()
    path = str(ROOT / "specs" / ("tiny.toml" if dry_run else "model.toml"))
    overrides = DRY if dry_run else MID
    warmup, steps = (1, 2) if dry_run else (3, 10)
    rows = []
    for n in (1, 4):
        over = overrides + [f"model.mhc.streams={n}"]
        t0 = time.perf_counter()
        r = bench.measure(path, list(over), warmup, steps)
        spec = load_spec(path, over + ['data.source="mock"'], world_size=1)
        util = mfu(float(flops_per_token(spec)), r["tokens_per_s"], 1)
        row = dict(spec=Path(path).name, streams=n, params=r["params"], step_s=r["step_time_s"],
                   tokens_per_s=r["tokens_per_s"], mfu=util, loss=r["final_loss"], sec=time.perf_counter() - t0)
        rows.append(row)
        log(f"train step {row['spec']} n={n}: {row['step_s'] * 1e3:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {'n/a' if util is None else f'{100 * util:.1f}%'} ({row['sec']:.0f} s)")
    for row in rows:
        row["overhead"] = row["step_s"] / rows[0]["step_s"]
    return rows


def _stored(model) -> tuple[dict, dict]:
    """model -> ({checkpoint key: {(global shape, global offset)}} of tensors, {key: count} of objects)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = dict(model.sharded_state_dict())
    apply_factories(sd)
    tensors, objects = {}, {}
    for v in sd.values():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, ShardedTensor):
                tensors.setdefault(item.key, set()).add((tuple(item.global_shape), tuple(item.global_offset)))
            elif isinstance(item, ShardedObject):
                objects[item.key] = objects.get(item.key, 0) + 1
    return tensors, objects


def _moe_spec():
    from dsv4cli.spec.schema import Spec

    return Spec.model_validate({
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                  "vocab_size": 256, "seq_length": 32, "mhc": {"streams": 4}, "mtp": {"depth": 1},
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32}},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "precision": "fp32"},
    })


def expert_key_rows(log) -> list[dict]:
    """Checkpoint keys of both expert layouts (grouped only with TE) -> rows (check, ok, detail)."""
    from dsv4cli.build import single_process, transformer_config
    from dsv4cli.build.gpu_settings import expert_checkpoint_key, gpu_settings, probe
    from dsv4cli.build.model import build_model_from_config
    from dsv4cli.compat import activate

    activate()
    spec = _moe_spec()
    rows = []
    with single_process(spec, seed=0):
        config = transformer_config(spec)
        seq_model = build_model_from_config(spec, dataclasses.replace(config, moe_grouped_gemm=False))
        seq_t, seq_o = _stored(seq_model)
        bad = []
        n_expert = 0
        for key in seq_model.state_dict():
            mapped = expert_checkpoint_key(key, spec.model.moe.num_experts)
            if mapped is None:
                continue
            n_expert += 1
            if not any(k == mapped[0] or k.startswith(mapped[0] + "_") for k in seq_t):
                bad.append(f"{key} -> {mapped[0]}")
        rows.append(dict(check="SequentialMLP keys = expert_checkpoint_key mapping", ok=not bad and n_expert > 0,
                         detail=f"{n_expert} expert weights" + (f"; unmapped: {bad[:3]}" if bad else "")))
        if not gpu_settings(spec, probe()).grouped_gemm:
            rows.append(dict(check="TEGroupedMLP keys = SequentialMLP keys", ok=None,
                             detail="skipped: grouped GEMM needs Transformer Engine >= 1.9 on CUDA"))
        else:
            grp_model = build_model_from_config(spec, dataclasses.replace(config, moe_grouped_gemm=True))
            assert any("weight0" in k for k in grp_model.state_dict()), "grouped model has no TEGroupedMLP"
            grp_t, grp_o = _stored(grp_model)
            diff = sorted(k for k in set(seq_t) | set(grp_t) if seq_t.get(k) != grp_t.get(k))
            expert_keys = [k for k in seq_t if ".experts.experts." in k]
            rows.append(dict(check="TEGroupedMLP keys = SequentialMLP keys (tensors: key, shape, offset)",
                             ok=not diff and bool(expert_keys),
                             detail=f"{len(seq_t)} keys ({len(expert_keys)} expert)" + (f"; differ: {diff[:4]}" if diff else "")))
            odiff = sorted(k for k in set(seq_o) | set(grp_o) if seq_o.get(k) != grp_o.get(k))
            rows.append(dict(check="TEGroupedMLP vs SequentialMLP extra-state objects (FP8 metadata; informational)",
                             ok=None, detail="same keys" if not odiff else f"differ: {odiff[:4]}"))
    for r in rows:
        log(f"expert keys: {'PASS' if r['ok'] else 'FAIL' if r['ok'] is False else 'info'} {r['check']}: {r['detail']}")
    return rows


def markdown(train, keys) -> list[str]:
    """Markdown lines for gpu_check's report (train / keys: rows, or a string saying why skipped)."""
    L = ["#### Training step (benchmarks/train.py's measure: one process, mock data)", ""]
    if isinstance(train, str):
        L.append(f"Skipped: {train}")
    else:
        L += ["| spec | streams | params | ms/step | tokens/s | MFU | step time vs n = 1 |", "|---|---|---|---|---|---|---|"]
        for r in train:
            util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            L.append(f"| {r['spec']} | {r['streams']} | {r['params']:,} | {r['step_s'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {util} | {r['overhead']:.3f} |")
        if len(train) > 1:
            L += ["", f"mHC overhead (n = 4 step time / n = 1): {train[-1]['overhead']:.3f}"]
    L += ["", "#### Expert checkpoint keys (TE grouped GEMM vs SequentialMLP)", ""]
    if isinstance(keys, str):
        L.append(f"Skipped: {keys}")
    else:
        L += ["| check | result | detail |", "|---|---|---|"]
        for r in keys:
            res = "PASS" if r["ok"] else "FAIL" if r["ok"] is False else "info"
            L.append(f"| {r['check']} | {res} | {r['detail']} |")
    return L + [""]
