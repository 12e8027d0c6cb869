"""convert-ckpt without torch (dsv4cli/ckpt/dcp_pickle.py, torch_zip.py, new_entries.py) against the torch path.

The torch path (DCP's reader, `dcp.save` of the new tensors, `pickle.dump`) is the reference: the
torch-free conversion must give a `.metadata` that torch reads to an equal `Metadata`, the same data
files byte for byte, and every tensor bit for bit; the CLI process must not import torch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from test_ckpt_convert import legacy, load_all  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent


def _iter_dir(root: Path) -> Path:
    return next(Path(root).glob("iter_*"))


def _torch_metadata(iter_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(iter_dir)).read_metadata()


def _attrs(md) -> dict:
    """Every attribute of a read Metadata; the reader's random load_id set aside."""
    out = dict(vars(md))
    out["storage_meta"] = dataclasses.replace(out["storage_meta"], load_id=None)
    return out


def _convert_both(src: Path, out: Path, monkeypatch, **kw) -> tuple[Path, Path]:
    """Convert SRC torch-free (asserted) and by the torch path -> (torch-free iter dir, torch iter dir)."""
    from dsv4cli.ckpt import convert, dcp_pickle

    used = []
    real = convert._entry_writer
    monkeypatch.setattr(convert, "_entry_writer", lambda info, t: used.append(real(info, t)) or used[-1])
    convert.convert_checkpoint(src, out / "free", **kw)
    assert used and used[0] is not None and dcp_pickle.is_standin(used[0].entry), "the torch-free path did not run"
    monkeypatch.setattr(convert, "_entry_writer", lambda info, t: None)
    convert.convert_checkpoint(src, out / "torch", **kw)
    return _iter_dir(out / "free"), _iter_dir(out / "torch")


def assert_same_conversion(free: Path, ref: Path) -> None:
    """Equal Metadata (every attribute, entry order too), data files byte for byte, tensors bit for bit."""
    import torch

    a, b = _torch_metadata(free), _torch_metadata(ref)
    assert a.state_dict_metadata == b.state_dict_metadata and list(a.state_dict_metadata) == list(b.state_dict_metadata)
    assert a.storage_data == b.storage_data and a.planner_data == b.planner_data
    assert _attrs(a) == _attrs(b)
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in free.iterdir()) == names
    for name in names:
        if name not in (".metadata", "dsv4_meta.json"):  # the torch path's .metadata holds its reader's load_id
            assert (free / name).read_bytes() == (ref / name).read_bytes(), name
    ta, tb = load_all(free), load_all(ref)
    assert ta.keys() == tb.keys()
    for k, v in tb.items():
        assert v.dtype == ta[k].dtype and torch.equal(v.view(-1).view(torch.uint8), ta[k].view(-1).view(torch.uint8)), k


# --- codec and writer units ---------------------------------------------------------------------

def test_metadata_round_trip_is_byte_identical(legacy):  # noqa: F811
    from dsv4cli.ckpt import dcp_pickle

    raw = (legacy / "iter_0000007" / ".metadata").read_bytes()
    md, proto = dcp_pickle.loads(raw)
    assert dcp_pickle.is_standin(md) and dcp_pickle.global_key(md)[1] == "Metadata"
    assert proto == raw[1] and dcp_pickle.dumps(md, proto) == raw


def test_stand_ins_read_like_torch_dataclasses(legacy):  # noqa: F811
    from dsv4cli.ckpt import dcp_pickle

    md, _ = dcp_pickle.load(legacy / "iter_0000007" / ".metadata")
    ref = _torch_metadata(legacy / "iter_0000007")
    key = "embedding.word_embeddings.weight"
    item, real = md.state_dict_metadata[key], ref.state_dict_metadata[key]
    assert tuple(item.size) == tuple(real.size) and len(item.chunks) == len(real.chunks)
    assert str(item.properties.dtype) == str(real.properties.dtype) == "torch.float32"
    got = sorted((i.fqn, s.relative_path, s.offset, s.length) for i, s in md.storage_data.items())
    assert got == sorted((i.fqn, s.relative_path, s.offset, s.length) for i, s in ref.storage_data.items())
    moved = dcp_pickle.replace(md, version="9.9")  # written back, torch reads the change
    buf = io.BytesIO(dcp_pickle.dumps(moved, 4))
    assert pickle.load(buf).version == "9.9"


def test_unknown_globals_are_refused():
    from dsv4cli.ckpt import dcp_pickle

    with pytest.raises(dcp_pickle.Unsupported):
        dcp_pickle.loads(pickle.dumps({"x": os.system}))


@pytest.mark.parametrize("shape", [(1,), (4,), (4, 128), (2, 3, 5), (300, 7)])
def test_torch_zip_is_what_torch_save_writes(shape):
    import torch

    from dsv4cli.ckpt.new_entries import NewTensor
    from dsv4cli.ckpt.torch_zip import Template, save_float32

    def saved(t) -> bytes:
        buf = io.BytesIO()
        torch.save(t, buf)
        return buf.getvalue()

    t = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    new = NewTensor(tuple(shape), __import__("array").array("f", t.flatten().tolist()))
    blob = save_float32(new.shape, new.to_bytes(), Template(saved(torch.ones(3))))
    assert blob == saved(t)
    back = torch.load(io.BytesIO(blob), weights_only=True)
    assert back.dtype == torch.float32 and torch.equal(back, t)


def test_new_tensor_values_round_as_torch_does():
    """hc_head_base: the float64 logit rounded to float32 exactly as torch's .to(torch.float32) rounds it."""
    import torch

    from dsv4cli.ckpt.convert import contraction_base
    from dsv4cli.ckpt.new_entries import NewTensor

    for n in (2, 3, 4, 8, 16):
        for eps in (1e-6, 2e-6, 1e-3, 0.01):
            base = contraction_base(n, eps)
            ref = torch.full((n,), base, dtype=torch.float64).to(torch.float32)
            assert torch.equal(NewTensor.full((n,), base).to_torch(), ref), (n, eps)


# --- whole conversions ----------------------------------------------------------------------------

def test_torch_free_conversion_equals_the_torch_path(legacy, tmp_path, monkeypatch):  # noqa: F811
    free, ref = _convert_both(legacy, tmp_path, monkeypatch)
    assert_same_conversion(free, ref)


@pytest.mark.parametrize("drop", [False, True])
def test_chained_fp32_param_state_and_dropped_optimizer_equal_the_torch_path(tmp_path, tiny_spec, monkeypatch, drop):
    """Param-copy states (fp32_param = the new value), `chained_*` prefixes, and --drop-optimizer (offsets relocated)."""
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec = tiny_spec(**{"model.contraction.mode": "average", "model.mtp.depth": 1})
    write_synthetic_checkpoint(tmp_path / "src", spec, chained=True, states=("exp_avg", "exp_avg_sq", "fp32_param"))
    free, ref = _convert_both(tmp_path / "src", tmp_path, monkeypatch, drop_optimizer=drop)
    assert_same_conversion(free, ref)
    tensors = load_all(free)
    copy = tensors.get("chained_0.optimizer.state.fp32_param.decoder.hc_head_base")
    if drop:
        assert copy is None and not any("optimizer" in k for k in tensors)
    else:
        assert copy is not None and (copy == tensors["decoder.hc_head_base"]).all()


def test_an_unknown_global_in_metadata_takes_the_torch_path(legacy, tmp_path):  # noqa: F811
    """A `.metadata` the codec does not know (here: an attribute of a class outside torch) is read by torch,
    and the conversion still runs, keeping that attribute."""
    import fractions

    from dsv4cli.ckpt import dcp_pickle
    from dsv4cli.ckpt.convert import convert_checkpoint
    from dsv4cli.ckpt.metadata import read_checkpoint_info

    it = legacy / "iter_0000007"
    md = _torch_metadata(it)
    md.extra_note = fractions.Fraction(1, 3)
    (it / ".metadata").write_bytes(pickle.dumps(md))
    assert not dcp_pickle.is_standin(read_checkpoint_info(legacy, torch_free=True).dcp_metadata)
    assert convert_checkpoint(legacy, tmp_path / "out").status == "converted"
    assert _torch_metadata(_iter_dir(tmp_path / "out")).extra_note == fractions.Fraction(1, 3)


_NO_TORCH = """
import json, sys
from dsv4cli.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def test_the_convert_process_never_imports_torch(legacy, tmp_path):  # noqa: F811
    """`dsv4 convert-ckpt` (copy and --link): torch is not in sys.modules when the command has finished."""
    for extra in ([], ["--link"]):
        dst = tmp_path / f"out{len(extra)}"
        p = subprocess.run([sys.executable, "-c", _NO_TORCH, "convert-ckpt", str(legacy), str(dst), *extra],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        status = json.loads(p.stdout.strip().splitlines()[-1])
        assert status == {"code": 0, "torch": []}, p.stdout + p.stderr
        assert (dst / "iter_0000007" / "__dsv4_hc_head.distcp").is_file()


def test_megatron_checkpoint_round_trips_and_converts_like_the_torch_path(megatron_1proc, tmp_path, monkeypatch):
    """A checkpoint megatron's dist_checkpointing wrote (`all_local_plans`, `_extra_state` byte entries,
    sharded chunks): byte-identical round trip of `.metadata`, conversion equal to the torch path."""
    from dsv4cli.ckpt import dcp_pickle
    from test_ckpt_megatron import _spec, save_model_checkpoint

    save_model_checkpoint(_spec("average", depth=1), tmp_path / "legacy", seed=5)
    raw = (_iter_dir(tmp_path / "legacy") / ".metadata").read_bytes()
    md, proto = dcp_pickle.loads(raw)
    assert dcp_pickle.dumps(md, proto) == raw and "all_local_plans" in md.__dict__["_state"]
    free, ref = _convert_both(tmp_path / "legacy", tmp_path, monkeypatch)
    assert_same_conversion(free, ref)


@pytest.mark.slow
def test_trained_checkpoint_round_trips_and_converts_like_the_torch_path(tmp_path, monkeypatch):
    """A checkpoint of a tiny `dsv4 train` run (optimizer state, RNG state, common.pt): byte-identical
    round trip of `.metadata`, conversion equal to the torch path."""
    from dsv4cli.ckpt import dcp_pickle
    from test_ckpt_e2e import SPEC, dsv4

    spec = tmp_path / "avg.toml"
    spec.write_text(SPEC.format(run=tmp_path / "run").replace("steps = 4", "steps = 2"))
    dsv4("train", str(spec), cwd=tmp_path)
    raw = (_iter_dir(tmp_path / "run") / ".metadata").read_bytes()
    md, proto = dcp_pickle.loads(raw)
    assert dcp_pickle.dumps(md, proto) == raw
    assert any(k.startswith("optimizer.state.") for k in md.state_dict_metadata)
    free, ref = _convert_both(tmp_path / "run", tmp_path, monkeypatch)
    assert_same_conversion(free, ref)


def test_a_large_metadata_takes_the_torch_path_with_the_same_result(legacy, tmp_path, monkeypatch):  # noqa: F811
    from dsv4cli.ckpt import convert, dcp_pickle

    convert.convert_checkpoint(legacy, tmp_path / "free")
    monkeypatch.setattr(convert, "TORCH_FREE_MAX_METADATA", 0)
    plan = convert.plan_conversion(legacy)
    assert dcp_pickle.is_standin(plan.info.dcp_metadata)
    assert convert._entry_writer(plan.info, convert.new_tensors(plan)) is None
    convert.convert_checkpoint(legacy, tmp_path / "torch")
    assert_same_conversion(_iter_dir(tmp_path / "free"), _iter_dir(tmp_path / "torch"))
