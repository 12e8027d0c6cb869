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

    with pytest.raises(dcp_pickle.Forbidden) as e:
        dcp_pickle.loads(pickle.dumps({"x": os.system}))
    assert e.value.name == f"{os.system.__module__}.system"


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


class _Run:
    """Unpickles to os.system(command): what a hostile `.metadata` would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _keyword_newobj(like):
    """A stand-in pickled as NEWOBJ_EX with a keyword (torch's dataclasses take it, the codec does not)
    and `like`'s state: a gap of the codec among allowed globals."""
    import copyreg

    from dsv4cli.ckpt import dcp_pickle

    cls = dcp_pickle.standin_class(*dcp_pickle.global_key(like))
    state = like.__dict__["_state"]
    cls.__reduce_ex__ = lambda self, proto: (copyreg.__newobj_ex__, (cls, (), {"checkpoint_id": None}), state)
    return dcp_pickle.StandIn.__new__(cls)


def _rewrite_metadata(iter_dir: Path, **state) -> None:
    """Write `.metadata` back (protocol 4) with `state` set on the stand-in Metadata."""
    from dsv4cli.ckpt import dcp_pickle

    md, _ = dcp_pickle.load(iter_dir / ".metadata")
    md.__dict__["_state"] = {**md.__dict__["_state"], **state}
    (iter_dir / ".metadata").write_bytes(dcp_pickle.dumps(md, 4))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4cli.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize("after_a_codec_gap", [False, True])
def test_a_global_outside_the_allow_list_is_refused_never_called(legacy, tmp_path, after_a_codec_gap):  # noqa: F811
    """A `.metadata` naming os.system: exit 2, one line naming it, and the command never ran -- also when the
    codec stops earlier (keyword NEWOBJ) and the file would otherwise go to torch's plain pickle.load."""
    from dsv4cli.ckpt import dcp_pickle

    it = legacy / "iter_0000007"
    marker = tmp_path / "ran"
    md, _ = dcp_pickle.load(it / ".metadata")
    if after_a_codec_gap:
        _rewrite_metadata(it, extra_note=(_keyword_newobj(md.storage_meta), _Run(f"touch {marker}")))
        with pytest.raises(dcp_pickle.Unsupported):
            dcp_pickle.load(it / ".metadata")
    else:
        (it / ".metadata").write_bytes(pickle.dumps(_Run(f"touch {marker}")))
    before = (it / ".metadata").read_bytes()
    p = _cli("convert-ckpt", str(legacy), str(tmp_path / "out"))
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert f".metadata references {os.system.__module__}.system" in line and "refusing to unpickle" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert (it / ".metadata").read_bytes() == before


def test_a_harmless_global_outside_the_allow_list_is_refused_too(legacy):  # noqa: F811
    import fractions

    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.metadata import read_checkpoint_info

    _rewrite_metadata(legacy / "iter_0000007", extra_note=fractions.Fraction(1, 3))
    with pytest.raises(CheckpointError, match="references fractions.Fraction"):
        read_checkpoint_info(legacy, torch_free=True)


def test_a_codec_gap_takes_the_torch_path(legacy, tmp_path):  # noqa: F811
    """A `.metadata` the codec cannot read (a keyword NEWOBJ of an allowed class) is read by torch, and the
    conversion still runs, keeping what it held."""
    from dsv4cli.ckpt import dcp_pickle
    from dsv4cli.ckpt.convert import convert_checkpoint
    from dsv4cli.ckpt.metadata import read_checkpoint_info

    it = legacy / "iter_0000007"
    md, _ = dcp_pickle.load(it / ".metadata")
    _rewrite_metadata(it, storage_meta=_keyword_newobj(md.storage_meta), version="7.7")
    assert not dcp_pickle.is_standin(read_checkpoint_info(legacy, torch_free=True).dcp_metadata)
    assert convert_checkpoint(legacy, tmp_path / "out").status == "converted"
    assert _torch_metadata(_iter_dir(tmp_path / "out")).version == "7.7"


@pytest.mark.parametrize("change", [{"storage_data": None}, {"planner_data": ["x"]}, {"state_dict_metadata": ()}])
def test_metadata_with_unexpected_fields_is_read_by_torch(legacy, tmp_path, change):  # noqa: F811
    """Valid pickles torch reads (a field absent or of another type) take the torch path, no traceback."""
    from dsv4cli.ckpt import dcp_pickle
    from dsv4cli.ckpt.metadata import read_dcp_metadata

    it = legacy / "iter_0000007"
    md, proto = dcp_pickle.load(it / ".metadata")
    state = {**md.__dict__["_state"], **change}
    if state["storage_data"] is None:
        del state["storage_data"]  # torch's Metadata defaults it to None
    md.__dict__["_state"] = state
    dcp_pickle.dump(md, it / ".metadata", proto)
    read = read_dcp_metadata(it, torch_free=True)
    assert not dcp_pickle.is_standin(read)
    if "storage_data" in change:
        assert read.storage_data is None
        p = _cli("convert-ckpt", str(legacy), str(tmp_path / "out"))
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert _torch_metadata(_iter_dir(tmp_path / "out")).storage_data  # the new tensors' entries


def test_a_stand_in_refusing_a_change_falls_back_to_the_torch_path(legacy, tmp_path, monkeypatch):  # noqa: F811
    """dcp_pickle.replace raising Unsupported while merging `.metadata`: DST is written through torch,
    equal to the torch path's."""
    from dsv4cli.ckpt import convert, dcp_pickle

    real, seen = convert._merge_metadata, []

    def merge(orig, *args):
        seen.append(dcp_pickle.is_standin(orig))
        if seen[-1]:
            raise dcp_pickle.Unsupported("cannot replace")
        return real(orig, *args)

    monkeypatch.setattr(convert, "_merge_metadata", merge)
    assert convert.convert_checkpoint(legacy, tmp_path / "free").status == "converted"
    assert seen == [True, False] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(convert, "_entry_writer", lambda info, t: None)
    convert.convert_checkpoint(legacy, tmp_path / "torch")
    assert_same_conversion(_iter_dir(tmp_path / "free"), _iter_dir(tmp_path / "torch"))


@pytest.mark.parametrize("damage", ["header", "truncated", "junk"])
def test_a_damaged_example_blob_is_unsupported(damage):
    import torch

    from dsv4cli.ckpt import dcp_pickle
    from dsv4cli.ckpt.torch_zip import Template

    buf = io.BytesIO()
    torch.save(torch.ones(3), buf)
    blob = buf.getvalue()
    bad = {"header": b"XXXX" + blob[4:], "truncated": blob[: len(blob) // 2], "junk": b"\0" * 64}[damage]
    with pytest.raises(dcp_pickle.Unsupported):
        Template(bad)


def test_a_damaged_example_tensor_takes_the_torch_path_and_is_copied_as_is(legacy, tmp_path):  # noqa: F811
    """A float32 entry whose bytes are damaged (same size: the integrity check passes): convert copies it
    byte for byte as the torch path does (the data are never read), exit 0, no traceback."""
    from dsv4cli.ckpt import dcp_pickle
    from dsv4cli.ckpt.new_entries import EntryWriter

    it = legacy / "iter_0000007"
    md, _ = dcp_pickle.load(it / ".metadata")
    si = EntryWriter(md, it).storage  # the example the torch-free writer copies
    with open(it / si.relative_path, "r+b") as f:
        f.seek(si.offset)
        f.write(b"XXXX")
    with pytest.raises(dcp_pickle.Unsupported):
        EntryWriter(md, it)
    p = _cli("convert-ckpt", str(legacy), str(tmp_path / "out"))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    out = _iter_dir(tmp_path / "out")
    assert (out / si.relative_path).read_bytes() == (it / si.relative_path).read_bytes()
    assert (out / "__dsv4_hc_head.distcp").is_file()


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
