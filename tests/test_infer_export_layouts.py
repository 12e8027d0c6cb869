"""`dsv4 export-hf --layout original`, MTP export and `--dtype fp8`: the tiny model of
tests/hf_tiny.py written in the release's layout with an `mtp.0.*` depth (tests/test_infer_import_layouts.py
builds it from the documented mapping) imports and exports back to every tensor bit for bit and the
same legacy config keys; the HF layout carries the MTP tensors under the names import-hf reads (HF
ignores them and gives the tiny model's logits); FP8 re-quantization is transformers' Fp8Quantize bit
for bit, and the export imports to transformers' dequantization of its bytes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from hf_tiny import VOCAB, hf_model, safetensors_dir_tensors  # noqa: E402  (after importorskip)
from test_infer_import_layouts import legacy_config, loaded, mtp_tensors, original_name, write_original  # noqa: E402

PROMPT = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
KEPT_FP32 = ("attn.attn_sink", "compressor.ape", "hc_head", "hc_attn_", "hc_ffn_", "ffn.gate.bias", "q_norm.weight",
             "attn.norm.weight", "compressor.norm.weight")


def _cli(*args) -> dict:
    from dsv4cli.cli import app

    result = CliRunner().invoke(app, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """save_pretrained of the tiny model, its import; the release layout with an MTP depth, its import."""
    root = tmp_path_factory.mktemp("export-layouts")
    model = hf_model()
    model.save_pretrained(root / "hf")
    _cli("import-hf", root / "hf", root / "hf-imported", "--json")
    hf_tensors = safetensors_dir_tensors(root / "hf")
    original = {original_name(k): v for k, v in hf_tensors.items()}
    mtp = mtp_tensors(original, torch.Generator().manual_seed(5))
    cfg = legacy_config(json.loads((root / "hf" / "config.json").read_text()), mtp_ratio=4)
    write_original(root / "original", {**original, **mtp}, cfg)
    assert _cli("import-hf", root / "original", root / "imported", "--json")["mtp_depth"] == 1
    return {"root": root, "model": model, "hf": hf_tensors, "original": {**original, **mtp}, "mtp": mtp, "cfg": cfg}


def test_original_layout_with_mtp_exports_every_tensor_and_legacy_key_back(tiny, tmp_path):
    result = _cli("export-hf", tiny["root"] / "imported", tmp_path / "out", "--layout", "original", "--json")
    assert result["layout"] == "original" and result["tensors"] == len(tiny["original"])
    got, source = safetensors_dir_tensors(tmp_path / "out"), tiny["original"]
    assert sorted(got) == sorted(source) and any(n.startswith("mtp.0.ffn.experts.") for n in got)
    assert [n for n, t in source.items() if got[n].dtype != t.dtype or not torch.equal(got[n], t)] == []
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: (v, config.get(k)) for k, v in tiny["cfg"].items() if config.get(k) != v} == {}
    assert config["compress_ratios"] == [0, 4, 8, 4] and config["num_nextn_predict_layers"] == 1
    assert "layer_types" not in config and "rope_parameters" not in config


def test_hf_layout_carries_mtp_under_names_import_reads_and_hf_ignores(tiny, tmp_path):
    """HF's model has no MTP (it drops `mtp.*` on load): the export keeps them, unprefixed, as the
    release names them; HF loads the rest with the tiny model's logits; import-hf reads them back."""
    from transformers import DeepseekV4ForCausalLM

    root = tiny["root"]
    _cli("export-hf", root / "imported", tmp_path / "out", "--json")
    got = safetensors_dir_tensors(tmp_path / "out")
    expected = {**tiny["hf"], **tiny["mtp"]}
    assert sorted(got) == sorted(expected)
    assert [n for n, t in expected.items() if got[n].dtype != t.dtype or not torch.equal(got[n], t)] == []
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    reloaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        assert torch.equal(reloaded(PROMPT).logits, tiny["model"](PROMPT).logits)
    again = _cli("import-hf", tmp_path / "out", tmp_path / "again", "--json")
    assert (again["layout"], again["mtp_depth"]) == ("hf", 1)
    ours, theirs = loaded(tmp_path / "again"), loaded(root / "imported")
    assert [k for k in theirs if ours[k].dtype != theirs[k].dtype or not ours[k].equal(theirs[k])] == []


def test_fp8_export_is_transformers_quantization_and_imports_to_its_dequantization(tiny, tmp_path):
    """8 x 8 blocks (the tiny model's weights are 16..64 wide; transformers quantizes whole blocks only):
    every quantized weight and scale equals transformers' Fp8Quantize of the source; the tensors the
    model keeps fp32 stay fp32 and exact, the hash table int64, the rest bf16; import-hf gives
    transformers' Fp8Dequantize of the exported bytes, within FP8 rounding of the source."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    from dsv4cli.infer.export_hf import export_hf

    result = export_hf(tiny["root"] / "hf-imported", tmp_path / "fp8", dtype="fp8", fp8_block=(8, 8))
    got, source = safetensors_dir_tensors(tmp_path / "fp8"), tiny["hf"]
    scales = {n for n in got if n.endswith(".weight_scale_inv")}
    assert result["quantized"] == len(scales) > 50 and len(got) == len(source) + len(scales)
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[8, 8], scale_fmt=None)))
    wrong = []
    for name, value in source.items():
        scale = name[: -len(".weight")] + ".weight_scale_inv"
        if scale in got:
            theirs = quantizer._quantize_one(name, value)
            same = got[name].view(torch.uint8).equal(theirs[name].view(torch.uint8)) and got[scale].equal(theirs[scale])
        elif any(k in name for k in KEPT_FP32) or not value.is_floating_point():
            same = got[name].dtype == value.dtype and got[name].equal(value)
        else:
            same = got[name].equal(value.to(torch.bfloat16))
        if not same:
            wrong.append(name)
    assert wrong == []
    assert {"model.layers.1.attn.wq_a.weight_scale_inv", "model.layers.0.ffn.experts.3.w2.weight_scale_inv",
            "model.layers.1.attn.indexer.wq_b.weight_scale_inv"} <= scales
    assert not {"model.layers.1.attn.compressor.wkv.weight_scale_inv", "model.layers.1.ffn.gate.weight_scale_inv"} & scales
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [8, 8] and config["dtype"] == "bfloat16"

    imported = _cli("import-hf", tmp_path / "fp8", tmp_path / "back", "--dtype", "float32", "--json")
    assert imported["dequantized"] == len(scales)
    state, deq = loaded(tmp_path / "back"), Fp8Dequantize(None)

    def dequantized(name):
        return deq._dequantize_one(got[name], got[name[: -len(".weight")] + ".weight_scale_inv"], output_dtype=torch.float32)

    checks = {"decoder.layers.1.self_attention.linear_q_down.weight": "model.layers.1.attn.wq_a.weight",
              "decoder.layers.2.self_attention.linear_o_up.weight": "model.layers.2.attn.wo_b.weight",
              "decoder.layers.1.mlp.shared_experts.linear_fc2.weight": "model.layers.1.ffn.shared_experts.w2.weight",
              "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight": "model.layers.0.ffn.experts.2.w2.weight"}
    assert [k for k, n in checks.items() if not state[k].equal(dequantized(n))] == []
    fc1 = torch.cat([dequantized(f"model.layers.2.ffn.experts.1.{w}.weight") for w in ("w1", "w3")])
    assert state["decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight"].equal(fc1)
    for k, n in checks.items():  # e4m3 keeps 3 mantissa bits: within 1/16 of each block's largest value
        assert 0 < (state[k] - source[n]).abs().max() <= source[n].abs().max() / 16, k


def test_transformers_loads_the_fp8_export_dequantized_on_cpu(tiny, tmp_path):
    """transformers reads an FP8 checkpoint on CPU by dequantizing it to bf16 (it needs accelerate):
    its weights are Fp8Dequantize of the exported bytes. Release layout names and 128 x 128 blocks too."""
    pytest.importorskip("accelerate")
    from transformers import DeepseekV4ForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from dsv4cli.infer.export_hf import export_hf

    export_hf(tiny["root"] / "hf-imported", tmp_path / "fp8", dtype="fp8", fp8_block=(8, 8))
    got, deq = safetensors_dir_tensors(tmp_path / "fp8"), Fp8Dequantize(None)

    def dequantized(name):
        return deq._dequantize_one(got[name], got[name[: -len(".weight")] + ".weight_scale_inv"], output_dtype=torch.bfloat16)

    model = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "fp8").eval()
    layer = model.model.layers[1]
    assert layer.self_attn.q_a_proj.weight.equal(dequantized("model.layers.1.attn.wq_a.weight"))
    assert layer.mlp.experts.gate_up_proj[3].equal(torch.cat([dequantized(f"model.layers.1.ffn.experts.3.{w}.weight")
                                                              for w in ("w1", "w3")]))
    assert layer.self_attn.sinks.dtype == torch.float32 and layer.self_attn.sinks.equal(got["model.layers.1.attn.attn_sink"])
    with torch.no_grad():
        assert torch.isfinite(model(PROMPT).logits).all()
    # the release's spelling: `.scale` next to each quantized weight, 128 x 128 blocks (one partial block here)
    result = _cli("export-hf", tiny["root"] / "imported", tmp_path / "original", "--dtype", "fp8", "--layout", "original",
                  "--json")
    original = safetensors_dir_tensors(tmp_path / "original")
    assert original["layers.1.attn.wq_a.scale"].shape == (1, 1) and original["mtp.0.e_proj.weight"].dtype == torch.float8_e4m3fn
    assert result["quantized"] == sum(n.endswith(".scale") for n in original)
    config = json.loads((tmp_path / "original" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128] and "compress_ratios" in config
    assert _cli("import-hf", tmp_path / "original", tmp_path / "back", "--json")["dequantized"] == result["quantized"]


@pytest.mark.parametrize("source, args", [
    ("imported", ("--layout", "original")),
    ("hf-imported", ("--dtype", "fp8")),
    ("imported", ("--dtype", "fp8", "--layout", "original"))])
def test_verify_passes_on_original_layout_and_fp8_exports(tiny, tmp_path, source, args):
    """--verify compares each written tensor with the checkpoint (FP8 ones dequantized, within FP8's
    tolerance) and, with transformers, runs HF's model on the export: exit 0 for these exports."""
    from dsv4cli.cli import app

    result = CliRunner().invoke(app, ["export-hf", str(tiny["root"] / source), str(tmp_path / "out"), *args,
                                      "--verify", "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])["verify"]
    assert report["ok"] and report["tensors"] and all(row["ok"] for row in report["tensors"])
    if "fp8" in args and "original" not in args:  # HF runs the FP8 export: judged by the FP8 tolerance
        assert report["model"]["ran"] and report["model"]["tolerance"]["min_cosine"] == 0.95


def test_export_dtype_error_lists_fp8_and_help_lists_the_json_keys():
    from dsv4cli.cli import app

    bad = CliRunner().invoke(app, ["export-hf", "ckpt", "out", "--dtype", "int4"])
    assert bad.exit_code == 2 and "fp8" in bad.output and "bf16" in bad.output
    help_text = " ".join(CliRunner().invoke(app, ["export-hf", "--help"], terminal_width=200).output.split())
    for key in ("layout", "quantized", "config_source", "shards"):
        assert f'"{key}"' in help_text, key
