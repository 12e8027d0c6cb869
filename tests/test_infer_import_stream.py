"""import-hf's streaming save (a meta-device model, each tensor made from the source when DCP's writer
asks for it: infer/stream_save.py) writes the checkpoint that building the whole model, putting every
source tensor in place and saving it with megatron's default torch_dist strategy writes: the same
keys, DCP metadata, tensors bit for bit, common.pt and dsv4 files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import hf_model  # noqa: E402  (after importorskip)


def _reference_import(hf_dir, out, dtype=None, toy=(None, None)):
    """The in-memory import: the whole model built (as for training: build_model_chunks), every tensor
    filled in place, saved by megatron's default strategy."""
    from dsv4cli.build.parallel import build_model_chunks, single_process
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.infer.import_hf import SourceReader, place, plan_import, target_value
    from dsv4cli.spec.layout import ParallelDims, single_process_spec

    plan = plan_import(hf_dir, out, layers=toy[0], experts=toy[1])
    with single_process(plan.spec, seed=0):
        model = build_model_chunks(single_process_spec(plan.spec))[0]
        targets = place(model, plan.sources, getattr(torch, dtype) if dtype else None)
        read = SourceReader(list(plan.sources.values()), plan.block)
        with torch.no_grad():
            for name, tensor in targets.state.items():
                tensor.data = target_value(targets, name, read).to(tensor.device)
        layout = ParallelDims.of(plan.spec, 1).checkpoint_layout()
        return save_checkpoint(out, [model], None, None, TrainProgress(), plan.spec_text, layout)


def _tensors(iter_dir) -> dict:
    from dsv4cli.ckpt.metadata import _tensor_entries, read_dcp_metadata
    from dsv4cli.ckpt.tensors import TensorReader

    metadata = read_dcp_metadata(iter_dir)
    reader = TensorReader(iter_dir, metadata)
    return {k: reader.load(entry) for k, entry in _tensor_entries(metadata)[0].items()}


@pytest.mark.parametrize("dtype, toy", [(None, (None, None)), ("bfloat16", (None, None)), (None, (2, 2))])
def test_streaming_import_writes_what_the_in_memory_import_writes(tmp_path, dtype, toy):
    """fp32 as stored, cast to bf16, and a toy variant (rows of routers cut, hash table taken modulo)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    from torch.distributed.checkpoint import FileSystemReader

    from dsv4cli.ckpt.layout import META_FILE, SPEC_FILE
    from dsv4cli.infer.import_hf import import_hf

    hf_model().save_pretrained(tmp_path / "hf")
    streamed = tmp_path / "streamed" / "iter_0000000"
    import_hf(tmp_path / "hf", tmp_path / "streamed", dtype=dtype, layers=toy[0], experts=toy[1])
    reference = _reference_import(tmp_path / "hf", tmp_path / "reference", dtype, toy)

    ours, theirs = (FileSystemReader(str(d)).read_metadata() for d in (streamed, reference))
    assert ours.state_dict_metadata.keys() == theirs.state_dict_metadata.keys()
    tensors_only = [k for k in theirs.state_dict_metadata if not k.startswith("rng_state")]
    assert {k: ours.state_dict_metadata[k] for k in tensors_only} == {
        k: theirs.state_dict_metadata[k] for k in tensors_only}  # sizes, dtypes, chunks
    assert getattr(ours, "mcore_data", None) == getattr(theirs, "mcore_data", None)

    a, b = _tensors(streamed), _tensors(reference)
    assert a.keys() == b.keys() and len(a) > 50
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    assert {str(t.dtype) for t in a.values()} >= {"torch.float32", "torch.int64"}

    # common.pt (megatron-core 0.16), or the "common_state" object among the tensors (0.19)
    assert (streamed / "common.pt").is_file() == (reference / "common.pt").is_file()
    common = [pickle.dumps(load_common_state_dict(str(d))) for d in (streamed, reference)]
    assert common[0] == common[1] and b"consumed_samples" in common[0]
    assert (streamed / "metadata.json").read_text() == (reference / "metadata.json").read_text()
    assert (streamed / SPEC_FILE).read_text() == (reference / SPEC_FILE).read_text()
    meta = [json.loads((d / META_FILE).read_text()) for d in (streamed, reference)]
    for m in meta:
        m.pop("saved_at", None)
    assert meta[0] == meta[1]
