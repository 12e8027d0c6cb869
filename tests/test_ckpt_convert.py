"""`dsv4 convert-ckpt` on checkpoints in Megatron's stored key layout (written with PyTorch DCP, no model).

Model-level checks against real Megatron checkpoints are in test_ckpt_megatron.py and the slow
end-to-end test in test_ckpt_e2e.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
HC = ("hc_head_fn", "hc_head_base", "hc_head_scale")


def run(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (dotfiles included)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load_all(iter_dir: Path) -> dict:
    """Every tensor of a DCP directory (small test checkpoints only)."""
    from dsv4cli.ckpt.tensors import load_all_tensors

    return load_all_tensors(iter_dir)


@pytest.fixture
def legacy(tmp_path, tiny_spec):
    """A legacy (average contraction, n=4, MTP depth 1) checkpoint root with per-parameter Adam state."""
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec = tiny_spec(**{"model.contraction.mode": "average", "model.contraction.eps": 2e-6})
    root = tmp_path / "legacy"
    write_synthetic_checkpoint(root, spec, iteration=7)
    return root


def test_converted_checkpoint_adds_function_preserving_contraction(legacy, tmp_path):
    import torch

    dst = tmp_path / "learned"
    res = run("convert-ckpt", str(legacy), str(dst), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["status"] == "converted" and out["streams"] == 4 and out["hidden"] == 32
    assert out["eps"] == 2e-6  # from the saved spec, not the default
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "7"
    conv_dir = dst / "iter_0000007"

    before, after = load_all(legacy / "iter_0000007"), load_all(conv_dir)
    added = sorted(set(after) - set(before))
    blocks = ("decoder.", "mtp.layers.0.")
    expect_model = sorted(b + n for b in blocks for n in HC)
    expect_opt = sorted(f"optimizer.state.{s}.{k}" for s in ("exp_avg", "exp_avg_sq") for k in expect_model)
    assert added == sorted(expect_model + expect_opt)
    for k, v in before.items():  # every other tensor bit for bit
        assert torch.equal(after[k], v), k

    n, eps = 4, 2e-6
    base64 = math.log(1 / n - eps) - math.log1p(-(1 / n - eps))
    for b in blocks:
        fn, base, scale = (after[b + name] for name in HC)
        assert fn.dtype == base.dtype == scale.dtype == torch.float32
        assert fn.shape == (n, n * 32) and not fn.any()
        assert torch.equal(scale, torch.ones(1))
        assert torch.equal(base, torch.full((n,), base64, dtype=torch.float64).float())
        pre = torch.sigmoid(base.double()) + eps
        assert torch.allclose(pre, torch.full((n,), 1 / n, dtype=torch.float64), rtol=1e-6, atol=0)
    for k in expect_opt:
        assert not after[k].any(), f"{k} must be a zero moment"

    spec_text = (conv_dir / "dsv4_spec.toml").read_text()
    assert 'mode = "learned"' in spec_text and "average" not in spec_text
    meta = json.loads((conv_dir / "dsv4_meta.json").read_text())
    assert meta["converted_from"] == str((legacy / "iter_0000007").resolve())
    assert meta["conversions"][-1]["from_iteration"] == 7


def test_source_is_byte_identical_after_conversion(legacy, tmp_path):
    before = tree_hashes(legacy)
    assert any(name.endswith(".metadata") for name in before)
    res = run("convert-ckpt", str(legacy), str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert tree_hashes(legacy) == before
    # the copied data files are the very same bytes
    src_files = {k.split("/")[-1]: h for k, h in before.items() if k.endswith(".distcp")}
    dst_files = tree_hashes(tmp_path / "out" / "iter_0000007")
    for name, h in src_files.items():
        assert dst_files[name] == h, name


def test_existing_dst_is_refused_without_force(legacy, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    res = run("convert-ckpt", str(legacy), str(dst))
    assert res.exit_code == 2
    assert "exists" in res.output and "--force" in res.output
    assert (dst / "keep.txt").read_text() == "user data"
    res = run("convert-ckpt", str(legacy), str(dst), "--force")
    assert res.exit_code == 0, res.output
    assert not (dst / "keep.txt").exists() and (dst / "iter_0000007" / ".metadata").is_file()


@pytest.mark.parametrize("stage", ["new-tensors", "metadata", "rename"])
def test_interrupted_conversion_leaves_no_dst(legacy, tmp_path, monkeypatch, stage):
    from dsv4cli.ckpt import convert

    original = convert.write_converted

    def failing(plan, dst, force, fail_hook=None, link=False):
        def hook(s):
            if s == stage:
                raise OSError(f"injected failure at {s}")

        return original(plan, dst, force, hook, link)

    monkeypatch.setattr(convert, "write_converted", failing)
    with pytest.raises(OSError, match="injected"):
        convert.convert_checkpoint(legacy, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy"], "temporary directory left behind"

    # with --force an existing DST survives a failed conversion untouched
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old.txt").write_text("previous")
    with pytest.raises(OSError, match="injected"):
        convert.convert_checkpoint(legacy, tmp_path / "dst", force=True)
    assert (tmp_path / "dst" / "old.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "legacy"]


def test_interrupted_copy_via_cli_leaves_no_dst(legacy, tmp_path, monkeypatch):
    from dsv4cli.ckpt import convert

    calls = []

    def broken_copy(src, dst, link):
        calls.append(src)
        raise OSError("disk full")

    monkeypatch.setattr(convert, "transfer", broken_copy)
    res = CliRunner().invoke(app, ["convert-ckpt", str(legacy), str(tmp_path / "dst")], env=ENV)
    assert res.exit_code == 1 and calls
    assert "disk full" in res.output and "not written" in res.output
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy"]


def test_already_converted_checkpoint_exits_0_and_writes_nothing(legacy, tmp_path):
    first = tmp_path / "learned"
    assert run("convert-ckpt", str(legacy), str(first)).exit_code == 0
    res = run("convert-ckpt", str(first), str(tmp_path / "again"))
    assert res.exit_code == 0, res.output
    assert "already converted" in res.output
    assert not (tmp_path / "again").exists()


def test_stream_count_disagreeing_with_stored_shapes_is_exit_2(legacy, tmp_path):
    res = run("convert-ckpt", str(legacy), str(tmp_path / "x"), "--streams", "2")
    assert res.exit_code == 2
    assert "mapping_proj" in res.output and "n = 4" in res.output
    assert not (tmp_path / "x").exists()


def test_spec_disagreeing_with_stored_shapes_is_exit_2(legacy, tmp_path):
    spec = tmp_path / "other.toml"
    text = (legacy / "iter_0000007" / "dsv4_spec.toml").read_text().replace("streams = 4", "streams = 2")
    assert "streams = 2" in text
    spec.write_text(text)
    res = run("convert-ckpt", str(legacy), str(tmp_path / "x"), "--spec", str(spec))
    assert res.exit_code == 2 and "streams" in res.output


def test_truncated_data_file_is_exit_2(legacy, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(legacy, bad)
    data = next((bad / "iter_0000007").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    res = run("convert-ckpt", str(bad), str(tmp_path / "x"))
    assert res.exit_code == 2
    assert "truncated" in res.output and data.name in res.output
    assert "Traceback" not in res.output


def test_corrupt_metadata_is_exit_2(legacy, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(legacy, bad)
    (bad / "iter_0000007" / ".metadata").write_bytes(b"not a pickle")
    res = run("convert-ckpt", str(bad), str(tmp_path / "x"))
    assert res.exit_code == 2 and ".metadata" in res.output
    res = run("convert-ckpt", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert res.exit_code == 2 and "no such" in res.output


def test_dst_inside_src_is_refused(legacy):
    res = run("convert-ckpt", str(legacy), str(legacy / "converted"))
    assert res.exit_code == 2 and "overlaps" in res.output


def test_megatron_lm_checkpoint_without_spec_uses_stored_shapes(legacy, tmp_path):
    (legacy / "iter_0000007" / "dsv4_spec.toml").unlink()
    (legacy / "iter_0000007" / "dsv4_meta.json").unlink()
    dst = tmp_path / "out"
    res = run("convert-ckpt", str(legacy / "iter_0000007"), str(dst), "--eps", "1e-5", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["streams"] == 4 and out["stream_source"] == "stored mapping_proj shapes"
    assert out["eps"] == 1e-5 and out["spec_written"] is False
    assert not (dst / "iter_0000007" / "dsv4_spec.toml").exists()
    base = load_all(dst / "iter_0000007")["decoder.hc_head_base"]
    assert abs(float(base[0]) - math.log((0.25 - 1e-5) / (0.75 + 1e-5))) < 1e-6


def _write_bucketed_optimizer_checkpoint(root: Path, spec) -> Path:
    """Model tensors + a distributed-optimizer state blob (not per parameter), as dp_reshardable saves it."""
    import torch
    import torch.distributed.checkpoint as dcp

    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    it = write_synthetic_checkpoint(root, spec, iteration=3, optimizer=False)
    sd = load_all(it)
    sd["optimizer.distributed.dp_group_idx_0.param_state"] = io.BytesIO(b"bucketed optimizer state" * 100)
    sd["optimizer.state.exp_avg.decoder.final_layernorm.weight"] = torch.zeros(32)
    for f in it.glob("*.distcp"):
        f.unlink()
    (it / ".metadata").unlink()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(it)), no_dist=True)
    return it


def test_bucketed_optimizer_state_needs_drop_optimizer(tmp_path, tiny_spec):
    spec = tiny_spec(**{"model.contraction.mode": "average"})
    src = tmp_path / "src"
    it = _write_bucketed_optimizer_checkpoint(src, spec)
    res = run("convert-ckpt", str(src), str(tmp_path / "x"))
    assert res.exit_code == 2
    assert "--drop-optimizer" in res.output and "not stored per parameter" in res.output
    assert not (tmp_path / "x").exists()

    res = run("convert-ckpt", str(src), str(tmp_path / "x"), "--drop-optimizer", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["optimizer"] == "dropped"
    before, after = load_all(it), load_all(tmp_path / "x" / "iter_0000003")
    assert not [k for k in after if k.startswith("optimizer.")]
    import torch

    for k, v in before.items():
        if not k.startswith("optimizer."):
            assert torch.equal(after[k], v), k
    # the compacted data files hold no optimizer bytes
    size = sum(p.stat().st_size for p in (tmp_path / "x" / "iter_0000003").glob("__0_*.distcp"))
    assert size < sum(p.stat().st_size for p in it.glob("*.distcp"))


def test_streams_1_checkpoint_has_nothing_to_convert(tmp_path, tiny_spec):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(tmp_path / "plain", tiny_spec(**{"model.mhc.streams": 1}), optimizer=False)
    res = run("convert-ckpt", str(tmp_path / "plain"), str(tmp_path / "x"))
    assert res.exit_code == 2 and "streams = 1" in res.output


def test_verify_checks_the_contraction_and_says_what_it_skipped(legacy, tmp_path):
    (legacy / "iter_0000007" / "dsv4_spec.toml").unlink()
    res = run("convert-ckpt", str(legacy), str(tmp_path / "out"), "--verify", "--json")
    assert res.exit_code == 0, res.output
    v = json.loads(res.output)["verify"]
    assert [c["check"] for c in v["checks"]] == ["contraction"]
    c = v["checks"][0]
    assert c["ok"] and c["max_abs_diff"] <= c["tolerance"] and set(c["per_block"]) == {"decoder", "mtp.layers.0"}
    assert any("no spec" in s for s in v["skipped"])


def test_verify_fails_with_exit_1_when_the_contraction_is_wrong(legacy, tmp_path, monkeypatch):
    """A conversion with the wrong eps baked in is caught (the check compares with the model's eps)."""
    from dsv4cli.ckpt import convert

    real_base = convert.contraction_base
    monkeypatch.setattr(convert, "contraction_base", lambda n, eps: real_base(n, eps) + 0.01)
    (legacy / "iter_0000007" / "dsv4_spec.toml").unlink()
    res = run("convert-ckpt", str(legacy), str(tmp_path / "out"), "--verify")
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output


def test_model_check_spec_keeps_the_padded_vocabulary_of_a_tensor_parallel_run(tiny_spec):
    from dsv4cli.spec.estimate import padded_vocab_size
    from dsv4cli.spec.layout import single_process_spec

    spec = tiny_spec(**{"parallel.tp": 2, "parallel.sequence_parallel": True, "model.vocab_size": 300})
    flat = single_process_spec(spec)
    assert (flat.parallel.tp, flat.parallel.sequence_parallel) == (1, False)
    assert padded_vocab_size(flat) == padded_vocab_size(spec) == 512
    assert spec.parallel.tp == 2  # the input spec is not modified


def test_flattened_distributed_optimizer_state_needs_drop_optimizer(tmp_path, tiny_spec):
    """Model-space distributed-optimizer entries are stored as [.., numel] views: refused, --drop-optimizer named."""
    import torch
    import torch.distributed.checkpoint as dcp

    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    it = write_synthetic_checkpoint(tmp_path / "src", tiny_spec(**{"model.contraction.mode": "average"}), iteration=2)
    sd = load_all(it)
    for k in [k for k in sd if k.startswith("optimizer.")]:
        sd[k] = sd[k].reshape(1, -1)
    for f in it.glob("*.distcp"):
        f.unlink()
    (it / ".metadata").unlink()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(it)), no_dist=True)
    res = run("convert-ckpt", str(tmp_path / "src"), str(tmp_path / "x"))
    assert res.exit_code == 2 and "flattened" in res.output and "--drop-optimizer" in res.output
    assert run("convert-ckpt", str(tmp_path / "src"), str(tmp_path / "x"), "--drop-optimizer").exit_code == 0
    assert not [k for k in load_all(tmp_path / "x" / "iter_0000002") if k.startswith("optimizer.")]
    assert torch.is_tensor(sd["embedding.word_embeddings.weight"])


def test_force_never_replaces_the_current_directory(legacy, tmp_path, monkeypatch):
    """`--force .` (or a parent of the working directory) would delete where the user stands: refused."""
    here = tmp_path / "work" / "sub"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("user data")
    monkeypatch.chdir(here)
    for dst in (".", "..", str(here)):
        res = run("convert-ckpt", str(legacy), dst, "--force")
        assert res.exit_code == 2, (dst, res.output)
        assert "current directory" in res.output
    assert (here / "notes.txt").read_text() == "user data"
    # a relative DST is fine, and is reported as typed
    res = run("convert-ckpt", str(legacy), "out/")
    assert res.exit_code == 0, res.output
    assert "-> out (iteration 7)" in res.output and (here / "out" / "iter_0000007" / ".metadata").is_file()


def test_dst_parents_are_created_like_mkdir_p(legacy, tmp_path):
    dst = tmp_path / "new" / "deeper" / "learned"
    res = run("convert-ckpt", str(legacy), str(dst))
    assert res.exit_code == 0, res.output
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["learned"]  # no temp dir left beside it
    (tmp_path / "a_file").write_text("x")
    res = run("convert-ckpt", str(legacy), str(tmp_path / "a_file" / "out"))
    assert res.exit_code == 2 and "is a file" in res.output and "Traceback" not in res.output
