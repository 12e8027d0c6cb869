"""`dsv4 inspect checkpoint` and `dsv4 inspect diff` on checkpoints in Megatron's stored key layout.

Checks against a real Megatron-saved model checkpoint are in test_ckpt_megatron.py.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def run_json(*args: str) -> dict:
    res = run(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.fixture
def spec_factory(tiny_spec):
    return tiny_spec


@pytest.fixture
def learned(tmp_path, tiny_spec):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec = tiny_spec()
    write_synthetic_checkpoint(tmp_path / "learned", spec, iteration=5)
    return tmp_path / "learned", spec


class OpenRecorder:
    """Records every path opened through open/io.open/os.open in this process."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def rec_open(file, *a, **k):
            self.paths.append(os.fspath(file) if not isinstance(file, int) else f"fd:{file}")
            return real_open(file, *a, **k)

        def rec_os_open(path, *a, **k):
            self.paths.append(os.fspath(path))
            return real_os_open(path, *a, **k)

        monkeypatch.setattr(builtins, "open", rec_open)
        monkeypatch.setattr(io, "open", rec_open)
        monkeypatch.setattr(os, "open", rec_os_open)

    def distcp(self) -> list[str]:
        return [p for p in self.paths if p.endswith(".distcp")]


def test_inspect_reports_format_iteration_spec_and_totals(learned):
    root, spec = learned
    from dsv4cli.ckpt.synthetic import stacked_inventory

    r = run_json("inspect", "checkpoint", str(root))
    for key in ("format", "iteration", "spec", "meta", "tensors", "total_params", "total_bytes", "by_dtype",
                "conformant", "problems"):
        assert key in r, key
    assert r["format"] == "torch_dist" and r["iteration"] == 5
    assert r["spec"]["model"]["mhc"]["streams"] == 4 and r["meta"]["iteration"] == 5
    inv = stacked_inventory(spec)
    model = {t["name"]: t for t in r["tensors"] if not t["name"].startswith("optimizer.")}
    assert {k: tuple(v["shape"]) for k, v in model.items()} == {k: tuple(v) for k, v in inv.items()}
    assert r["total_params"] == sum(
        __import__("math").prod(s) for s in inv.values()
    )
    assert r["by_dtype"]["float32"]["tensors"] == len(r["tensors"]) == 3 * len(inv)
    assert r["total_bytes"] == sum(t["bytes"] for t in r["tensors"]) == 3 * 4 * r["total_params"]
    assert r["conformant"] is True and r["problems"] == [] and r["legacy"] is False
    groups = {g["group"] for g in r["tree"]}
    assert {"embedding", "decoder.layers", "decoder", "mtp.layers.*", "output_layer"} <= groups


def test_inspect_default_mode_opens_no_distcp_file(learned, monkeypatch):
    root, _ = learned
    rec = OpenRecorder(monkeypatch)
    r = run_json("inspect", "checkpoint", str(root))
    assert r["tensor_count"] > 0
    assert any(p.endswith(".metadata") for p in rec.paths), "recorder saw nothing: it is not wired"
    assert rec.distcp() == []
    res = run("inspect", "checkpoint", str(root))  # table mode too
    assert res.exit_code == 0 and rec.distcp() == []
    # --stats reads data, and the recorder sees it
    run_json("inspect", "checkpoint", str(root), "--stats", "--filter", "decoder.final_layernorm.weight")
    assert rec.distcp()


def test_inspect_of_a_checkpoint_without_its_data_files_is_exit_2(learned):
    """The report itself needs only metadata, but a checkpoint whose data files are gone is damaged:
    exit 2, one line naming the file, no convert-ckpt offer."""
    root, _ = learned
    it = root / "iter_0000005"
    aside = it.parent / "aside"
    aside.mkdir()
    for f in it.glob("*.distcp"):
        shutil.move(str(f), aside / f.name)
    for args in ([], ["--json"]):
        res = run("inspect", "checkpoint", str(root), *args)
        assert res.exit_code == 2, res.output
        (line,) = res.output.strip().splitlines()
        assert "__0_0.distcp is missing" in line and "convert-ckpt" not in line


def test_inspect_flags_checkpoint_without_hc_head_as_legacy(tmp_path, tiny_spec):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec = tiny_spec()  # learned contraction: hc_head_* expected
    root = tmp_path / "nohead"
    write_synthetic_checkpoint(root, spec, omit=("hc_head_fn", "hc_head_base", "hc_head_scale"))
    r = run_json("inspect", "checkpoint", str(root))
    assert r["conformant"] is False and r["legacy"] is True
    assert r["fix_command"] == f"dsv4 convert-ckpt {root} {root}-learned"
    missing = {p["name"] for p in r["problems"] if p["kind"] == "missing"}
    assert missing == {f"{b}{n}" for b in ("decoder.", "mtp.layers.0.") for n in ("hc_head_fn", "hc_head_base", "hc_head_scale")}
    assert any(p["kind"] == "legacy" and "convert-ckpt" in p["message"] for p in r["problems"])
    res = run("inspect", "checkpoint", str(root))
    assert res.exit_code == 0
    assert "legacy" in res.output and f"dsv4 convert-ckpt {root}" in res.output


def test_inspect_legacy_average_checkpoint_is_conformant_but_flagged(tmp_path, tiny_spec):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    root = tmp_path / "avg"
    write_synthetic_checkpoint(root, tiny_spec(**{"model.contraction.mode": "average"}))
    r = run_json("inspect", "checkpoint", str(root))
    assert r["conformant"] is True and r["legacy"] is True and "convert-ckpt" in r["fix_command"]


def test_inspect_against_another_spec_lists_mis_shaped_and_unexpected(learned, tmp_path):
    root, spec = learned
    from dsv4cli.spec.load import spec_to_toml

    other = spec.model_copy(deep=True)
    other.model.ffn_hidden_size = 96
    other.model.mtp.depth = 0
    p = tmp_path / "other.toml"
    p.write_text(spec_to_toml(other))
    r = run_json("inspect", "checkpoint", str(root), "--spec", str(p))
    assert r["conformant"] is False and r["spec_source"] == str(p)
    kinds = {(q["kind"], q["name"]) for q in r["problems"]}
    assert ("mis-shaped", "decoder.layers.mlp.linear_fc1.weight") in kinds
    assert ("mis-shaped", "decoder.layers.mlp.linear_fc2.weight") in kinds
    assert ("unexpected", "mtp.layers.0.hc_head_fn") in kinds
    assert not [k for k in kinds if k[0] == "missing"]


def test_inspect_filter_and_stats_match_the_stored_values(learned):
    import torch

    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.ckpt.tensors import TensorReader

    root, _ = learned
    r = run_json("inspect", "checkpoint", str(root), "--stats", "--filter", "decoder.layers.*mapping_proj*")
    assert [t["name"] for t in r["tensors"]] == [
        "decoder.layers.self_attention_hyper_connection.mapping_proj.weight",
        "decoder.layers.mlp_hyper_connection.mapping_proj.weight",
    ]
    info = read_checkpoint_info(root)
    reader = TensorReader(info.iter_dir)
    for t in r["tensors"]:
        x = reader.load(info.tensors[t["name"]]).double()
        st = t["stats"]
        assert st["nan"] == 0 and st["inf"] == 0
        assert st["norm"] == pytest.approx(float(x.norm()), rel=1e-12)
        assert st["mean"] == pytest.approx(float(x.mean()), rel=1e-9, abs=1e-15)
        assert st["std"] == pytest.approx(float(x.std(unbiased=False)), rel=1e-9)
        assert (st["min"], st["max"]) == (float(x.min()), float(x.max()))
        assert torch.is_tensor(x)


def test_inspect_stats_counts_nan_and_inf(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "plain"
    t = torch.tensor([1.0, float("nan"), float("inf"), -3.0])
    dcp.save({"w": t}, storage_writer=dcp.FileSystemWriter(str(d)), no_dist=True)
    r = run_json("inspect", "checkpoint", str(d), "--stats")
    assert r["format"] == "dcp" and r["conformant"] is None
    st = r["tensors"][0]["stats"]
    assert (st["nan"], st["inf"], st["min"], st["max"]) == (1, 1, -3.0, 1.0)


def test_inspect_unreadable_input_is_exit_2(tmp_path):
    res = run("inspect", "checkpoint", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "no such" in res.output
    (tmp_path / "empty").mkdir()
    res = run("inspect", "checkpoint", str(tmp_path / "empty"))
    assert res.exit_code == 2 and "not a checkpoint" in res.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(b"\x80\x04garbage")
    res = run("inspect", "checkpoint", str(tmp_path / "bad"), "--json")
    assert res.exit_code == 2 and "unreadable" in res.output and "Traceback" not in res.output
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "latest_checkpointed_iteration.txt").write_text("12")
    res = run("inspect", "checkpoint", str(tmp_path / "root"))
    assert res.exit_code == 2 and "iter_0000012" in res.output


def test_diff_reports_added_keys_and_value_changes(learned, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    root, _ = learned
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    d = run_json("inspect", "diff", str(root), str(copy))
    assert d["only_in_a"] == d["only_in_b"] == d["changed"] == []
    assert d["different"] == 0 and d["identical"] == len(d["compared"]) > 0

    # rewrite B with one tensor changed, one removed, one reshaped, one added
    from dsv4cli.ckpt.tensors import load_all_tensors as load_all

    it = copy / "iter_0000005"
    sd = load_all(it)
    sd["decoder.final_layernorm.weight"] = sd["decoder.final_layernorm.weight"] + 0.5
    del sd["output_layer.weight"]
    sd["embedding.word_embeddings.weight"] = sd["embedding.word_embeddings.weight"][:128].clone()
    sd["extra.bias"] = torch.zeros(3)
    for f in it.glob("*.distcp"):
        f.unlink()
    (it / ".metadata").unlink()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(it)), no_dist=True)
    d = run_json("inspect", "diff", str(root), str(copy))
    assert [e["name"] for e in d["only_in_a"]] == ["output_layer.weight"]
    assert [e["name"] for e in d["only_in_b"]] == ["extra.bias"]
    assert [c["name"] for c in d["changed"]] == ["embedding.word_embeddings.weight"]
    diffs = {c["name"]: c for c in d["compared"] if not c["identical"]}
    assert list(diffs) == ["decoder.final_layernorm.weight"]
    assert diffs["decoder.final_layernorm.weight"]["max_abs_diff"] == pytest.approx(0.5, rel=1e-6)
    res = run("inspect", "diff", str(root), str(copy))
    assert res.exit_code == 0 and "only in A: 1" in res.output
    assert run("inspect", "diff", str(root), str(tmp_path / "none")).exit_code == 2


@pytest.mark.parametrize("moe", [False, True])
def test_per_layer_stored_checkpoint_is_conformant_and_converts(tmp_path, tiny_spec, moe):
    """Heterogeneous layers are stored per layer (`decoder.layers.{i}.…`): inspect and convert handle both forms."""
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    extra = {"model.moe": {"num_experts": 3, "top_k": 2, "expert_ffn_hidden_size": 8}} if moe else {}
    spec = tiny_spec(**{"model.contraction.mode": "average", **extra})
    root = tmp_path / "perlayer"
    write_synthetic_checkpoint(root, spec, stack_layers=False)
    r = run_json("inspect", "checkpoint", str(root))
    names = [t["name"] for t in r["tensors"]]
    assert "decoder.layers.1.self_attention_hyper_connection.mapping_proj.weight" in names
    assert not any(n.startswith("decoder.layers.self_attention") for n in names)
    assert r["conformant"] is True, r["problems"]
    assert r["legacy"] is True
    groups = {g["group"]: g for g in r["tree"]}
    folded = {row["name"]: row["count"] for row in groups["decoder.layers.*"]["rows"]}
    assert folded["decoder.layers.*.self_attention.linear_qkv.weight"] == 2  # repeated layers folded
    res = run("convert-ckpt", str(root), str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["streams"] == 4
    after = run_json("inspect", "checkpoint", str(tmp_path / "out"))
    assert after["conformant"] is True and after["legacy"] is False, after["problems"]


def test_saved_spec_naming_paths_absent_here_is_still_read(tmp_path, tiny_spec):
    """A checkpoint copied to another machine: its spec's data/checkpoint paths do not exist there."""
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec = tiny_spec(**{"checkpoint.load": "/nonexistent/run", "data.source": "indexed",
                        "data.paths": ["/nonexistent/corpus"], "data.weights": [1.0]})
    write_synthetic_checkpoint(tmp_path / "moved", spec)
    r = run_json("inspect", "checkpoint", str(tmp_path / "moved"))
    assert r["spec"] is not None and r["spec_source"] == "saved dsv4_spec.toml"
    assert r["conformant"] is True and not r["problems"]


def test_diff_and_stats_of_a_truncated_checkpoint_are_clean_errors(learned, tmp_path):
    """A data file cut short: `diff` exits 2 with one line (no traceback), `--stats` reports it per tensor."""
    root, _ = learned
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    it = broken / "iter_0000005"
    data = sorted(it.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:100])
    res = run("inspect", "diff", str(root), str(broken))
    assert res.exit_code == 2, res.output
    assert "truncated" in res.output and "Traceback" not in res.output

    # a file whose size is right but whose bytes are garbage: the tensor read itself fails
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.ckpt.tensors import TensorReader
    from dsv4cli.ckpt.errors import CheckpointError

    shutil.rmtree(broken)
    shutil.copytree(root, broken)
    info = read_checkpoint_info(broken)
    entry = info.tensors["output_layer.weight"]
    (storage,) = [s for i, s in info.dcp_metadata.storage_data.items() if i.fqn == entry.name]
    raw = bytearray((it / storage.relative_path).read_bytes())
    raw[storage.offset: storage.offset + storage.length] = b"\x00" * storage.length
    (it / storage.relative_path).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="output_layer.weight"):
        TensorReader(info.iter_dir, info.dcp_metadata).load(entry)
    r = run_json("inspect", "checkpoint", str(broken), "--stats", "--filter", "output_layer.weight")
    assert "cannot read tensor output_layer.weight" in r["tensors"][0]["stats"]["error"]
    res = run("inspect", "diff", str(root), str(broken))
    assert res.exit_code == 2 and "output_layer.weight" in res.output and "Traceback" not in res.output
    assert "compared" in res.output  # every other tensor was still compared and reported
    res = run("inspect", "diff", str(root), str(broken), "--json")
    assert res.exit_code == 2
    d = json.loads(res.stdout)
    assert [u["name"] for u in d["unreadable"]] == ["output_layer.weight"]
    assert d["different"] == 0 and d["identical"] == len(d["compared"]) > 0


def test_damaged_meta_json_is_reported_and_damaged_common_pt_stops_convert(learned, tmp_path):
    root, _ = learned
    it = root / "iter_0000005"
    assert (it / "common.pt").is_file()
    r = run_json("inspect", "checkpoint", str(root))
    assert r["conformant"] is True and not [p for p in r["problems"] if p["kind"] in ("corrupt", "meta")]

    (it / "dsv4_meta.json").write_text("{not json")
    r = run_json("inspect", "checkpoint", str(root))
    assert r["meta"] is None
    assert [p["name"] for p in r["problems"] if p["kind"] == "meta"] == ["dsv4_meta.json"]
    assert r["conformant"] is True  # provenance is lost, the tensors still match the spec

    # common.pt is not one of the files inspect reads; convert, which copies it, checks its zip CRCs
    good = (it / "common.pt").read_bytes()
    (it / "common.pt").write_bytes(good[: len(good) // 2])  # truncated zip
    assert run_json("inspect", "checkpoint", str(root))["iteration"] == 5
    res = run("convert-ckpt", str(root), str(tmp_path / "out"))
    assert res.exit_code == 2 and "common.pt" in res.output and not (tmp_path / "out").exists()
    (it / "common.pt").write_bytes(b"garbage\n")
    res = run("convert-ckpt", str(root), str(tmp_path / "out"))
    assert res.exit_code == 2 and "common.pt" in res.output and "Traceback" not in res.output
    (it / "common.pt").write_bytes(good)
    res = run("convert-ckpt", str(root), str(tmp_path / "out"))
    assert res.exit_code == 0, res.output


def test_inspect_default_mode_reads_only_the_metadata_files(learned, monkeypatch):
    """.metadata, metadata.json, dsv4_spec.toml, dsv4_meta.json (and the root's tracker file): nothing else."""
    root, _ = learned
    rec = OpenRecorder(monkeypatch)
    r = run_json("inspect", "checkpoint", str(root))
    assert r["conformant"] is True
    opened = {os.path.basename(p) for p in rec.paths if p.startswith(str(root))}
    assert opened <= {".metadata", "metadata.json", "dsv4_spec.toml", "dsv4_meta.json",
                      "latest_checkpointed_iteration.txt"}, opened
    assert ".metadata" in opened and "dsv4_spec.toml" in opened


def test_unreadable_saved_spec_names_file_line_and_key(learned):
    root, _ = learned
    (root / "iter_0000005" / "dsv4_spec.toml").write_text("[model]\nnum_layers = 2\nhidden_size = \"big\"\n")
    r = run_json("inspect", "checkpoint", str(root))
    (spec_problem,) = [p for p in r["problems"] if p["kind"] == "spec"]
    assert "dsv4_spec.toml:3: model.hidden_size:" in spec_problem["message"]
    assert "dsv4_spec.toml:1: model.vocab_size: required key is missing" in spec_problem["message"]


def test_moe_synthetic_checkpoint_keeps_the_unfused_pre_mlp_norm(tmp_path, tiny_spec):
    """MoE layers have no linear_fc1 to fuse the pre-MLP norm into: Megatron stores pre_mlp_layernorm.weight."""
    from dsv4cli.ckpt.synthetic import stacked_inventory

    moe = tiny_spec(**{"model.moe": {"num_experts": 2, "top_k": 1, "expert_ffn_hidden_size": 8}})
    keys = set(stacked_inventory(moe))
    assert "decoder.layers.pre_mlp_layernorm.weight" in keys
    assert "mtp.layers.0.transformer_layer.pre_mlp_layernorm.weight" in keys
    assert not any("linear_fc1.layer_norm_weight" in k for k in keys)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    dense = set(stacked_inventory(tiny_spec()))
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in dense
    assert not any("pre_mlp_layernorm" in k for k in dense)


@pytest.mark.parametrize("command", [["convert-ckpt"], ["inspect", "checkpoint"], ["inspect", "diff"]], ids=" ".join)
def test_help_says_what_the_command_does_with_an_example(command):
    res = run(*command, "--help")
    assert res.exit_code == 0, res.output
    assert "Examples:" in res.output
    assert any(l.strip().startswith("dsv4 " + " ".join(command) + " ") for l in res.output.splitlines()), res.output


@pytest.mark.parametrize("name,content,kind", [
    ("dsv4_spec.toml", b"\xff\xfe\x00binary", "spec"),
    ("dsv4_meta.json", b"\xff\xfe", "meta"),
    ("dsv4_meta.json", b"[1, 2]", "meta"),
    ("metadata.json", b"\xff", "corrupt"),
])
def test_binary_or_odd_metadata_files_are_problems_not_tracebacks(learned, tmp_path, name, content, kind):
    root, _ = learned
    (root / "iter_0000005" / name).write_bytes(content)
    res = run("inspect", "checkpoint", str(root), "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert any(p["kind"] == kind and name in p["message"] for p in r["problems"]), r["problems"]
    res = run("inspect", "checkpoint", str(root))
    assert res.exit_code == 0 and "Traceback" not in res.output
    res = run("convert-ckpt", str(root), str(tmp_path / "out"))
    assert res.exit_code in (0, 2) and "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


def test_binary_tracker_file_is_exit_2_for_every_command(learned, tmp_path):
    root, _ = learned
    (root / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\x00")
    for args in (["inspect", "checkpoint", str(root)], ["inspect", "diff", str(root), str(root)],
                 ["convert-ckpt", str(root), str(tmp_path / "out")]):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert "latest_checkpointed_iteration.txt" in res.output and "Traceback" not in res.output


def test_set_overrides_the_spec_in_use(learned, tmp_path):
    """--set, as on every command that takes a spec: applied to --spec, else to the saved spec."""
    root, _ = learned
    r = run_json("inspect", "checkpoint", str(root), "--set", "model.mhc.streams=2")
    assert r["spec_source"] == "saved dsv4_spec.toml + --set" and r["spec"]["model"]["mhc"]["streams"] == 2
    assert r["conformant"] is False and any(p["kind"] == "mis-shaped" for p in r["problems"])
    res = run("inspect", "checkpoint", str(root), "--set", "model.mhc.streemz=2")
    assert res.exit_code == 2 and "did you mean 'streams'" in res.output
    (root / "iter_0000005" / "dsv4_spec.toml").unlink()
    res = run("inspect", "checkpoint", str(root), "--set", "model.mhc.streams=2")
    assert res.exit_code == 2 and "--spec" in res.output and "Traceback" not in res.output


def test_convert_set_overrides_the_saved_spec(tmp_path, tiny_spec):
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(tmp_path / "legacy", tiny_spec(**{"model.contraction.mode": "average"}), iteration=3)
    res = run("convert-ckpt", str(tmp_path / "legacy"), str(tmp_path / "out"), "--set", "model.contraction.eps=1e-5",
              "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["eps"] == 1e-5 and "--set" in out["eps_source"]
    assert "eps = 1e-05" in (tmp_path / "out" / "iter_0000003" / "dsv4_spec.toml").read_text()
    res = run("convert-ckpt", str(tmp_path / "legacy"), str(tmp_path / "out2"), "--set", "model.mhc.streams=2")
    assert res.exit_code == 2 and "n = 4" in res.output and not (tmp_path / "out2").exists()
