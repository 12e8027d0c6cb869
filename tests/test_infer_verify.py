"""`--verify` on import-hf and export-hf, import's size forecast and free-space check: the tiny HF
DeepseekV4ForCausalLM imported and exported with --verify passes (a row per tensor, every one equal to
its source, HF's model and dsv4's within the fp32 tolerance layer by layer); a tensor changed on disk
or on the way fails naming it (exit 1); without transformers the per-tensor part still runs."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections import namedtuple

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_tiny import hf_model  # noqa: E402  (after importorskip)

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


def _cli(*args):
    from dsv4cli.cli import app

    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny HF model saved, then `dsv4 import-hf --verify --json`: (root, exit code, stdout object)."""
    root = tmp_path_factory.mktemp("verify")
    hf_model().save_pretrained(root / "hf")
    result = _cli("import-hf", root / "hf", root / "out", "--verify", "--json")
    return root, result.exit_code, json.loads(result.stdout)  # stdout: one JSON object, nothing else


def _source_names(directory) -> list[str]:
    from dsv4cli.infer.safetensors_io import tensor_sources

    return list(tensor_sources(directory))


def test_import_verify_passes_with_a_row_per_tensor_and_hfs_model_within_tolerance(imported):
    root, code, out = imported
    assert code == 0
    report = out["verify"]
    assert report["ok"] is True and out["tensors"] == len(report["tensors"])
    assert [r["name"] for r in report["tensors"]] == _source_names(root / "hf")
    assert all(r["matches"] and r["max_abs_diff"] == 0.0 for r in report["tensors"])
    assert report["model"]["ran"] and report["model"]["dtype"] == {"hf": "float32", "dsv4": "float32"}
    names = [r["name"] for r in report["layers"]]
    assert names == ["embeddings", "layer 0", "layer 1", "layer 2", "final norm"]
    tol = report["model"]["tolerance"]
    for row in [*report["layers"], report["logits"]]:
        assert row["ok"] and row["max_abs_diff"] <= tol["atol"] + tol["rtol"] * 10 and row["cosine"] >= tol["min_cosine"]
    assert 0 < report["logits"]["max_abs_diff"]  # two implementations: equal to rounding, not bit for bit
    # the forecast: every source tensor's numel x the dtype it was saved in
    assert out["forecast"] == sum(math.prod(r["shape"]) * ITEMSIZE[r["written"]] for r in report["tensors"])


def test_verify_reads_one_expert_of_a_stacked_expert_tensor_at_a_time(imported, monkeypatch):
    """The per-tensor check never loads a layer's whole stacked [E, ...] expert weight: one expert each."""
    from dsv4cli.ckpt.tensors import TensorReader
    from dsv4cli.infer.region_reader import RegionReader
    from dsv4cli.infer.verify import verify_import

    root = imported[0]
    whole, regions = [], []
    real_load, real_read = TensorReader.load, RegionReader.read
    monkeypatch.setattr(TensorReader, "load", lambda self, entry: whole.append(entry.name) or real_load(self, entry))
    monkeypatch.setattr(RegionReader, "read", lambda self, entry, offsets=(), sizes=():
                        regions.append((entry.name, tuple(sizes))) or real_read(self, entry, offsets, sizes))
    report = verify_import(root / "hf", root / "out" / "iter_0000000", root / "out" / "spec.toml", model=False)
    assert report["ok"] is True
    assert [n for n in whole if ".experts.experts." in n] == []
    stacked = [(n, sizes) for n, sizes in regions if ".experts.experts." in n]
    assert stacked and all(sizes[0] == 1 for _, sizes in stacked)


def test_a_tensor_changed_on_disk_fails_naming_it(imported, tmp_path):
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.ckpt.tensors import TensorReader
    from dsv4cli.infer.verify import render, verify_import

    root = imported[0]
    shutil.copytree(root / "out", tmp_path / "out")
    iter_dir = tmp_path / "out" / "iter_0000000"
    info = read_checkpoint_info(iter_dir)
    name = "decoder.layers.1.self_attention.linear_kv.weight"
    value = TensorReader(iter_dir, info.dcp_metadata).load(info.tensors[name])
    (where,) = [s for k, s in info.dcp_metadata.storage_data.items() if k.fqn == name]
    data = bytearray((iter_dir / where.relative_path).read_bytes())
    at = data.find(value.numpy().tobytes(), where.offset, where.offset + where.length)
    assert at >= 0
    value[3, 5] += 0.5
    data[at:at + value.numel() * 4] = value.numpy().tobytes()
    (iter_dir / where.relative_path).write_bytes(bytes(data))
    report = verify_import(root / "hf", iter_dir, tmp_path / "out" / "spec.toml", model=False)
    failed = [r for r in report["tensors"] if not r["ok"]]
    assert [r["name"] for r in failed] == ["model.layers.1.attn.wkv.weight"] and not report["ok"]
    assert failed[0]["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    text = render(report)
    assert any(line.startswith("model.layers.1.attn.wkv.weight") and "FAIL" in line for line in text)
    assert text[-1] == "verify: FAILED"


def test_a_bad_import_is_exit_1_naming_the_tensor(imported, tmp_path, monkeypatch):
    """An import that puts a wrong value in place (simulated) is caught by --verify: exit 1."""
    import dsv4cli.infer.import_hf as import_hf

    real = import_hf.target_value

    def made_then_damaged(targets, name, read):
        value = real(targets, name, read)
        if name == "decoder.layers.2.self_attention.sinks":
            value[1] += 1.0
        return value

    monkeypatch.setattr(import_hf, "target_value", made_then_damaged)
    result = _cli("import-hf", imported[0] / "hf", tmp_path / "out", "--verify")
    assert result.exit_code == 1, result.output
    bad = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert bad[0].startswith("model.layers.2.attn.attn_sink ")
    assert any(line.startswith("layer 2 ") for line in bad)  # the model comparison sees it from that layer on
    assert "layer 0 " not in "".join(bad) and result.stdout.strip().endswith("verify: FAILED")


def test_a_verification_that_cannot_run_is_reported_in_the_json_and_exit_1(imported, tmp_path, monkeypatch):
    """--json --verify: when the check itself fails (here dsv4's forward raises), stdout still holds the
    command's one JSON object, its "verify" {"ok": false, "error": one line}; exit 1, no traceback."""
    import dsv4cli.infer.verify_model as verify_model

    def broken(*args, **kwargs):
        raise RuntimeError("forward broke\nits last line")

    monkeypatch.setattr(verify_model, "dsv4_outputs", broken)
    result = _cli("import-hf", imported[0] / "hf", tmp_path / "out", "--verify", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    got = json.loads(result.stdout)
    assert got["verify"] == {"ok": False, "error": "verify could not run: RuntimeError: its last line"}
    assert got["checkpoint"] == str(tmp_path / "out" / "iter_0000000") and (tmp_path / "out").is_dir()
    text = _cli("import-hf", imported[0] / "hf", tmp_path / "out-text", "--verify")
    assert text.exit_code == 1 and text.output.strip().endswith("error: verify could not run: RuntimeError: its last line")


def test_without_transformers_the_tensors_are_still_checked_and_the_extra_is_named(imported, tmp_path, monkeypatch):
    from dsv4cli.infer.import_hf import import_hf
    from dsv4cli.infer.verify import render, verify_import

    calls = []
    result = import_hf(imported[0] / "hf", tmp_path / "bf16", dtype="bfloat16",
                       progress=lambda *a: calls.append(a))
    assert calls[-1][0] == calls[-1][2] and calls[-1][1] == calls[-1][3] == result["tensors"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    report = verify_import(imported[0] / "hf", result["checkpoint"], result["spec"])
    assert report["ok"] and not report["model"]["ran"] and report["layers"] == []
    assert all(r["matches"] for r in report["tensors"])
    kinds = {r["written"] for r in report["tensors"]}
    assert kinds == {"bfloat16", "float32", "int64"}  # cast, kept fp32, the integer table
    text = render(report)
    assert "pip install 'dsv4[hf]'" in text[-2] and text[-1] == "verify: OK"
    assert result["forecast"] == sum(math.prod(r["shape"]) * ITEMSIZE[r["written"]] for r in report["tensors"])


def test_export_verify_passes_and_a_changed_export_fails_naming_it(imported, tmp_path):
    from safetensors.torch import load_file, save_file

    from dsv4cli.infer.verify import verify_export

    root = imported[0]
    result = _cli("export-hf", root / "out", tmp_path / "exp", "--verify", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    report = out["verify"]
    assert report["ok"] and [r["name"] for r in report["tensors"]] == _source_names(tmp_path / "exp")
    assert all(r["matches"] for r in report["tensors"]) and report["model"]["ran"]
    assert len(report["layers"]) == 5 and report["logits"]["ok"]
    tensors = load_file(str(tmp_path / "exp" / "model.safetensors"))
    tensors["model.layers.0.ffn.experts.3.w3.weight"][0, 0] += 0.25
    save_file(tensors, str(tmp_path / "exp" / "model.safetensors"), metadata={"format": "pt"})
    report = verify_export(root / "out", tmp_path / "exp", "hf", model=False)
    assert [r["name"] for r in report["tensors"] if not r["ok"]] == ["model.layers.0.ffn.experts.3.w3.weight"]
    assert not report["ok"]
    assert verify_export(root / "out", tmp_path / "exp", "original", model=False)["problems"]


def test_not_enough_disk_space_is_exit_2_before_anything_is_written(imported, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    result = _cli("import-hf", imported[0] / "hf", tmp_path / "sub" / "out")
    assert result.exit_code == 2
    assert "not enough disk space" in result.output and "1000 bytes free" in result.output
    assert f"{imported[2]['forecast']} bytes needed" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_quantized_release_imports_and_verifies_against_its_dequantized_values(imported, tmp_path):
    """FP8 / FP4 weights (the release's layout): "matches original" = equal to the dequantized value in the
    saved dtype (bf16); HF cannot load this directory, which the report says instead of comparing."""
    from safetensors.torch import load_file

    from test_infer_import_layouts import FP8_BLOCK, legacy_config, original_name, quantized_release, write_original

    root = imported[0]
    tensors = {original_name(k): v for k, v in load_file(str(root / "hf" / "model.safetensors")).items()}
    cfg = {**legacy_config(json.loads((root / "hf" / "config.json").read_text())),
           "quantization_config": {"quant_method": "fp8", "weight_block_size": FP8_BLOCK}}
    src = write_original(tmp_path / "fp8", quantized_release(tensors), cfg)
    result = _cli("import-hf", src, tmp_path / "out", "--verify", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["verify"]["tensors"]
    assert out["verify"]["ok"] and len(rows) == out["tensors"] and all(r["matches"] for r in rows)
    quantized = [r for r in rows if "scale" in r["source"]]
    assert len(quantized) == out["dequantized"] and {r["written"] for r in quantized} == {"bfloat16"}
    assert any(r["source"].startswith("F8_E4M3 x ") for r in quantized) and any(r["source"] == "I8 x U8 scale" for r in quantized)
    assert all(r["max_abs_diff"] == 0 for r in quantized)  # e4m3 / e2m1 x a power of two: exact in bf16
    assert not out["verify"]["model"]["ran"] and out["verify"]["model"]["reason"]
    assert out["forecast"] == sum(math.prod(r["shape"]) * ITEMSIZE[r["written"]] for r in rows)


def test_export_cast_to_bf16_is_compared_in_bf16_and_passes_by_cosine(imported, tmp_path):
    result = _cli("export-hf", imported[0] / "out", tmp_path / "bf16", "--dtype", "bf16", "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["verify"]
    assert report["ok"] and all(r["matches"] for r in report["tensors"])
    assert {r["written"] for r in report["tensors"]} == {"bfloat16", "float32", "int64"}
    assert report["model"]["dtype"] == {"hf": "bfloat16", "dsv4": "float32"}
    assert report["model"]["tolerance"]["atol"] is None  # 16 bits: judged by the cosine
    rows = [*report["layers"], report["logits"]]
    assert all(r["limit"] is None and 0.99 <= r["cosine"] < 1 for r in rows[1:])
