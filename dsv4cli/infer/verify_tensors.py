"""`--verify`'s per-tensor half: every tensor of a DeepSeek-V4 safetensors directory against the dsv4
checkpoint tensor(s) it maps to (hf_names.placements), both read back from disk one tensor at a time.

    import-hf --verify   HF_DIR (the source)     vs OUT's checkpoint (what was written)
    export-hf --verify   OUT (what was written)  vs CKPT (the source)

A row per safetensors tensor: its name, shape, the dtype written, the source's dtype, the max abs
difference (in fp64) between what was written and the source, and "matches original": what was
written equals the source value cast to the written dtype, bit for bit. Quantized tensors (FP8 /
FP4 with a scale) are dequantized in fp32 first, exactly as import-hf does (dequant.py), so an
import of quantized weights matches its dequantized values; an FP8 export cannot match bit for bit
and passes when its error stays within FP8's rounding (QUANT_RTOL of the tensor's largest value).
A checkpoint tensor no safetensors tensor covers is a failing row of its own.

Memory: one safetensors tensor and one checkpoint tensor at a time (megatron stores each layer's
experts stacked [E, ...]: only the one expert compared is read, region_reader.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dsv4cli.infer.dequant import DEFAULT_BLOCK, dequantize
from dsv4cli.infer.hf_names import layer_table, part_rows, placements
from dsv4cli.infer.safetensors_io import SourceTensor, stream_scaled

QUANT_RTOL = 2.0**-4
"""An FP8 e4m3 value (3 mantissa bits) is within 2^-4 of its block's largest magnitude once rounded."""
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_LAYER = re.compile(r"^(mtp\.layers|decoder\.layers)\.(\d+)\.")


@dataclass
class TensorRow:
    """One compared tensor. `written`: the dtype of the copy the command wrote; `source`: the dtype it
    came from (a quantized one: its safetensors format, "F8_E4M3 x F32 scale"); a tensor that could not
    be compared (no place, no counterpart) has "-" for both, max_abs_diff None and `note` says why."""

    name: str
    shape: list
    written: str
    source: str
    max_abs_diff: Optional[float]
    matches: bool
    ok: bool
    note: str = ""


class CheckpointTensors:
    """The dsv4 checkpoint's tensors by per-layer state name (`decoder.layers.3.mlp.experts.local_experts.5.
    linear_fc1.weight`), read on demand: a tensor stored stacked ([E, ...] experts, layers under one key)
    only its own region (RegionReader), the last one cached (fc1's gate and up halves: one read)."""

    def __init__(self, iter_dir: Path):
        from dsv4cli.ckpt.conformance import canonical_tensors
        from dsv4cli.ckpt.metadata import read_checkpoint_info
        from dsv4cli.infer.region_reader import RegionReader

        info = read_checkpoint_info(iter_dir)
        self.entries = info.tensors
        self.names = canonical_tensors(info.tensors)  # per-layer name -> (shape, stored name)
        self.reader = RegionReader(info.iter_dir, info.dcp_metadata)
        self.cached: tuple[Optional[str], object] = (None, None)
        self.used: set[str] = set()

    def get(self, name: str):
        """The tensor of per-layer state name `name` (CPU, stored dtype); KeyError when not stored."""
        shape, stored = self.names[name]
        self.used.add(name)
        if self.cached[0] == name:
            return self.cached[1]
        entry, index = self.entries[stored], []
        if tuple(entry.shape) != tuple(shape):
            if stored.startswith("decoder.layers.") and not stored[len("decoder.layers."):][:1].isdigit():
                index.append(int(_LAYER.match(name).group(2)))  # layers stacked under one key
            if ".mlp.experts.experts." in stored:
                index.append(int(_LOCAL_EXPERT.search(name).group(1)))
        value = self.reader.read(entry, tuple(index), (1,) * len(index)).reshape(shape)
        self.cached = (name, value)
        return value


def _region(whole, part: str, rows: int):
    if whole.dim() == 0:
        return whole
    start, count = part_rows(part, whole.shape[0], rows)
    return whole[start:start + count]


def dsv4_side(ckpt: CheckpointTensors, name: str, shape: tuple, table: dict):
    """The dsv4 checkpoint's value for safetensors tensor `name` of `shape`, assembled as the table
    places it (halves of fused fc1, first rows of padded tables, elements of [3] scales, fused experts).
    KeyError naming a target the checkpoint lacks; None for a name the table does not know."""
    import torch

    found = placements(name, table, shape)
    if found is None:
        return None
    pieces = []
    for p in found:
        target = next((t for t in p.targets if t in ckpt.names), None)
        if target is None:
            raise KeyError(p.targets[0])
        pieces.append(_region(ckpt.get(target), p.part, shape[0] if shape else 0))
    if found[0].element is None:
        return pieces[0]
    return torch.stack([piece.reshape(shape[1:]) for piece in pieces])


def _compare(name: str, written, source, quantized: bool) -> TensorRow:
    """`written` vs `source`: max abs difference in fp64 and bit-equality after casting the source."""
    import torch

    from dsv4cli.ckpt.metadata import dtype_name

    shape, kinds = list(written.shape), (dtype_name(written.dtype), dtype_name(source.dtype))
    if tuple(written.shape) != tuple(source.shape):
        return TensorRow(name, shape, *kinds, None, False, False, f"source shape {list(source.shape)}")
    diff = (written.double() - source.double()).abs().max().item() if written.numel() else 0.0
    matches = torch.equal(written, source.to(written.dtype))
    ok = matches or (quantized and diff <= QUANT_RTOL * source.double().abs().max().item())
    return TensorRow(name, shape, *kinds, diff, matches, ok)


def compare(sources: dict[str, SourceTensor], iter_dir: Path, written_is_checkpoint: bool,
            block: tuple[int, int] = DEFAULT_BLOCK) -> list[TensorRow]:
    """A row per safetensors tensor of `sources` (scales folded in, dequant.fold_scales; a toy variant's
    `rows` / `modulo` applied as import-hf applies them) against the checkpoint `iter_dir`, then a
    failing row per checkpoint tensor that none of them covers. `written_is_checkpoint`: True for
    import (the checkpoint is what was written), False for export."""
    import torch

    ckpt = CheckpointTensors(Path(iter_dir))
    table = layer_table()
    rows: list[TensorRow] = []
    for source, tensor, scale in stream_scaled(list(sources.values())):
        quantized = scale is not None
        if quantized:
            tensor = dequantize(tensor, scale, torch.float32, block)
        if source.rows is not None:
            tensor = tensor[: source.rows]
        if source.modulo is not None:
            tensor = tensor % source.modulo
        try:
            ours = dsv4_side(ckpt, source.name, tuple(tensor.shape), table)
        except KeyError as e:
            rows.append(TensorRow(source.name, list(tensor.shape), "-", "-", None, False, False,
                                  f"the checkpoint has no {e.args[0]}"))
            continue
        if ours is None:
            rows.append(TensorRow(source.name, list(tensor.shape), "-", "-", None, False, False,
                                  "no place in dsv4's model"))
            continue
        written, original = (ours, tensor) if written_is_checkpoint else (tensor, ours)  # dequantized: fp32
        row = _compare(source.name, written, original, quantized and not written_is_checkpoint)
        if quantized:  # the stored format, not the fp32 of its dequantized value
            row.source = f"{source.dtype} x {source.scale.dtype} scale"
        rows.append(row)
    position = {name: i for i, name in enumerate(sources)}
    rows.sort(key=lambda r: position[r.name])  # the source's order
    for name in sorted(set(ckpt.names) - ckpt.used):
        rows.append(TensorRow(name, list(ckpt.names[name][0]), "-", "-", None, False, False,
                              "checkpoint tensor not covered by any safetensors tensor"))
    return rows


def rows_json(rows: list[TensorRow]) -> list[dict]:
    return [asdict(r) for r in rows]
