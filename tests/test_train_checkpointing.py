"""Checkpoints of training (dsv4cli.ckpt): directory handling (atomic publish, keep_last, stale temp dirs),
the one resolver, spec-mismatch refusal, and a real 1-process save/load round trip with dsv4_spec.toml /
dsv4_meta.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv4cli.ckpt import atomic, conformance
from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.layout import TMP_PREFIX, TRACKER_FILE, iter_dir_name, latest_iteration, resolve_checkpoint


def _fake_iter(d, it):
    p = d / iter_dir_name(it)
    p.mkdir(parents=True)
    (p / ".metadata").write_bytes(b"x")
    return p


def test_publish_renames_then_moves_latest(tmp_path):
    tmp = atomic.tmp_dir_for(tmp_path, 5, "abc")
    tmp.mkdir()
    (tmp / "payload").write_text("1")
    assert latest_iteration(tmp_path) is None
    final = atomic.publish(tmp, tmp_path, 5)
    assert final == tmp_path / "iter_0000005" and (final / "payload").read_text() == "1"
    assert not tmp.exists()
    assert latest_iteration(tmp_path) == 5
    assert (tmp_path / TRACKER_FILE).read_text().strip() == "5"


def test_incomplete_save_never_becomes_latest_and_is_cleaned(tmp_path):
    _fake_iter(tmp_path, 2)
    (tmp_path / TRACKER_FILE).write_text("2\n")
    half = atomic.tmp_dir_for(tmp_path, 4, "999")  # a save killed midway leaves only this
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    loc = resolve_checkpoint(tmp_path)
    assert (loc.iter_dir, loc.root, loc.iteration) == (tmp_path / "iter_0000002", tmp_path, 2)
    assert not (tmp_path / "iter_0000004").exists()
    removed = atomic.remove_stale_tmp(tmp_path)
    assert removed == [half] and not half.exists()


def test_republishing_an_iteration_replaces_it(tmp_path):
    old = _fake_iter(tmp_path, 3)
    (old / "old").write_text("")
    tmp = atomic.tmp_dir_for(tmp_path, 3, "n")
    tmp.mkdir()
    (tmp / "new").write_text("")
    atomic.publish(tmp, tmp_path, 3)
    assert (tmp_path / "iter_0000003" / "new").exists() and not (tmp_path / "iter_0000003" / "old").exists()
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_keep_last_prunes_oldest_but_never_latest(tmp_path):
    for it in (1, 2, 3, 4):
        _fake_iter(tmp_path, it)
    (tmp_path / TRACKER_FILE).write_text("4")
    removed = atomic.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000002"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    assert atomic.prune(tmp_path, 0) == []


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / TRACKER_FILE).write_text("7")
    with pytest.raises(CheckpointError, match="iteration 7"):
        resolve_checkpoint(tmp_path)
    d = _fake_iter(tmp_path, 7)
    loc = resolve_checkpoint(d)
    assert (loc.iter_dir, loc.root, loc.iteration) == (d, tmp_path, 7)


def test_the_one_resolver_reads_release_and_the_saved_iteration(tmp_path):
    root = tmp_path / "root"
    rel = root / "release"
    rel.mkdir(parents=True)
    (rel / ".metadata").write_bytes(b"x")
    (root / TRACKER_FILE).write_text("release\n")
    loc = resolve_checkpoint(root)
    assert (loc.iter_dir, loc.root, loc.iteration) == (rel, root, None)
    assert latest_iteration(root) is None
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / ".metadata").write_bytes(b"x")
    assert resolve_checkpoint(bare).iteration is None
    (bare / "dsv4_meta.json").write_text('{"iteration": 12}')
    assert resolve_checkpoint(bare).iteration == 12
    (bare / "dsv4_meta.json").write_text("{not json")
    assert resolve_checkpoint(bare).iteration is None


def test_write_text_atomic_replaces_whole_files_and_can_set_the_mode(tmp_path):
    f = tmp_path / "new" / "job.sbatch"
    atomic.write_text_atomic(f, "one")
    atomic.write_text_atomic(f, "two", mode=0o755)
    assert f.read_text() == "two" and f.stat().st_mode & 0o777 == 0o755
    atomic.write_text_atomic(f, "three", mode=0o644, fsync=False)
    assert f.read_text() == "three" and f.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in f.parent.iterdir()] == ["job.sbatch"], "no temporary file is left"


def test_model_spec_difference_names_keys(tiny_spec):
    from dsv4cli.spec.load import spec_to_toml

    saved = tiny_spec()
    now = tiny_spec(**{"model.mhc.streams": 2, "model.hidden_size": 64, "train.lr": 1.0})
    diffs = conformance.model_spec_differences(spec_to_toml(saved), now)
    keys = [d.split(":")[0] for d in diffs]
    assert keys == ["model.hidden_size", "model.mhc.streams"], diffs  # train.* may change
    assert conformance.model_spec_differences(spec_to_toml(saved), tiny_spec(**{"train.steps": 7})) == []


def test_save_load_roundtrip_writes_provenance(tmp_path, tiny_spec, cpu_compat):
    import torch

    from dsv4cli.ckpt.load import load_checkpoint
    from dsv4cli.ckpt.metadata import stored_tensors
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.spec.load import spec_to_toml
    from dsv4cli.build.parallel import destroy_parallel
    from dsv4cli.train.runtime import build_runtime, run_microbatches

    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4cli.compat.versions import mtp_loss_key, mtp_tracked_losses

    spec = tiny_spec(**{"checkpoint.dir": str(tmp_path)})
    MTPLossLoggingHelper.tracker[mtp_loss_key()] = torch.tensor([9.0])  # left over by an earlier run
    rt = build_runtime(spec)
    assert mtp_tracked_losses() is None, "a new run starts with an empty MTP tracker"
    try:
        s, b = spec.model.seq_length, spec.train.micro_batch_size
        g = np.random.default_rng(0)
        tokens = g.integers(0, 256, (b, s + 1))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": np.ones((b, s), np.float32),
                 "position_ids": np.tile(np.arange(s), (b, 1))}
        run_microbatches(rt, [batch], forward_only=False)
        assert rt.optimizer.step()[0], "one optimizer step so that Adam has state"
        prog = TrainProgress(iteration=3, consumed_samples=6, tokens_seen=96)
        path = save_checkpoint(tmp_path, rt.chunks, rt.optimizer, rt.scheduler, prog, spec_to_toml(spec),
                               rt.dims.checkpoint_layout())
        assert path == tmp_path / "iter_0000003" and latest_iteration(tmp_path) == 3
        meta = json.loads((path / "dsv4_meta.json").read_text())
        for key in ("dsv4_version", "torch_version", "megatron_core_version", "git_commit", "spec_hash",
                    "parallel", "iteration", "tokens_seen"):
            assert key in meta, key
        assert meta["iteration"] == 3 and meta["tokens_seen"] == 96 and meta["parallel"]["tp"] == 1
        assert "[model]" in (path / "dsv4_spec.toml").read_text()
        names = stored_tensors(path)
        assert any(k.startswith("optimizer.state.exp_avg.") for k in names), "per-parameter optimizer keys"
        assert any(k.endswith("hc_head_fn") for k in names)
        saved = {k: v.detach().clone() for k, v in rt.chunks[0].state_dict().items() if torch.is_tensor(v)}
        for p in rt.chunks[0].parameters():
            p.data.zero_()
        progress, notes = load_checkpoint(path, rt.chunks, rt.optimizer, rt.scheduler, rt.dims.checkpoint_layout())
        assert progress == prog and notes == []
        for k, v in rt.chunks[0].state_dict().items():
            if torch.is_tensor(v) and k in saved:
                assert torch.equal(v, saved[k]), k
        shapes = {}
        for c in rt.chunks:
            shapes.update(conformance.model_tensor_shapes(c.sharded_state_dict()))
        assert conformance.tensor_mismatches(path, shapes) == []
        shapes["decoder.final_layernorm.weight"] = (999,)
        shapes["extra.weight"] = (1,)
        probs = conformance.tensor_mismatches(path, shapes)
        assert any(p.startswith("missing: extra.weight") for p in probs)
        assert any(p.startswith("mis-shaped: decoder.final_layernorm.weight") for p in probs)
    finally:
        destroy_parallel()
