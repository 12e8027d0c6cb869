"""`dsv4 import-hf`: a tiny HF DeepseekV4ForCausalLM saved with `save_pretrained` becomes a dsv4
checkpoint + spec; every tensor name HF writes has its place, both config styles give the same spec,
an unknown tensor is exit 2 naming it, and the source directory is never changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_tiny import VOCAB, hf_model, tree_digest  # noqa: E402  (after importorskip)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-v4"
    hf_model().save_pretrained(path)
    return path


def _import(*args):
    from dsv4cli.cli import app

    return CliRunner().invoke(app, ["import-hf", *map(str, args)])


def test_every_tensor_hf_writes_has_a_place(hf_dir):
    from safetensors import safe_open

    from dsv4cli.infer.hf_names import layer_table, placements

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.1.attn.indexer.compressor.ape" in names and "head.weight" in names
    assert "model.layers.0.ffn.gate.tid2eid" in names and "model.layers.1.ffn.gate.bias" in names
    table = layer_table()
    assert [n for n in names if placements(n, table) is None] == []
    assert placements("model.layers.0.attn.norm.weight", table)[0].targets == (
        "decoder.layers.0.self_attention.kv_norm.weight",)


def test_legacy_and_new_config_keys_give_the_same_spec(hf_dir):
    """The release's keys (compress_ratios incl. its MTP entry, num_hash_layers, rope_scaling,
    qk_rope_head_dim) and what transformers writes describe one model."""
    from dsv4cli.infer.hf_config import spec_data

    new = json.loads((hf_dir / "config.json").read_text())
    legacy = {k: v for k, v in new.items()
              if k not in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters",
                           "partial_rotary_factor")}
    legacy.update(compress_ratios=[0, 4, 128, 4], num_hash_layers=1, qk_rope_head_dim=8, rope_theta=10000.0,
                  compress_rope_theta=160000.0,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                "beta_fast": 32.0, "beta_slow": 1.0})
    a, b = spec_data(new), spec_data(legacy)
    assert a["model"]["attention"]["compress_ratios"] == [0, 4, 8]
    b["model"]["attention"]["compress_ratios"][2] = 8  # the legacy list says 128 for HCA; this config 8
    b["model"]["seq_length"] = a["model"]["seq_length"]
    assert a == b
    assert a["model"]["attention"]["layer_types"] == ["sliding", "csa", "hca"]
    assert a["model"]["moe"]["hash_layers"] == 1 and a["model"]["attention"]["yarn_factor"] == 4.0
    assert a["data"]["eos_token_ids"] == [new["eos_token_id"]]


def test_config_values_dsv4_cannot_express_are_refused():
    from dsv4cli.infer.hf_config import HFConfigError, spec_data

    base = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 16}
    with pytest.raises(HFConfigError, match="num_key_value_heads"):
        spec_data({**base, "num_key_value_heads": 2})
    with pytest.raises(HFConfigError, match="hash_moe"):
        spec_data({**base, "mlp_layer_types": ["moe", "hash_moe"]})
    with pytest.raises(HFConfigError, match="attention_factor"):
        spec_data({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3}})


def test_written_spec_validates(hf_dir, tmp_path):
    from dsv4cli.cli import app
    from dsv4cli.infer.import_hf import plan_import

    plan = plan_import(hf_dir, tmp_path / "out")
    spec = tmp_path / "spec.toml"
    spec.write_text(plan.spec_text)
    result = CliRunner().invoke(app, ["validate", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    assert "mtp" in plan.spec_text and plan.spec.model.mtp.depth == 0
    assert (plan.spec.parallel.tp, plan.spec.parallel.pp, plan.spec.parallel.ep) == (1, 1, 1)


def test_unknown_tensor_is_exit_2_naming_it_and_the_source_is_unchanged(hf_dir, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    save_file({"model.layers.0.attn.mystery.weight": torch.zeros(2)}, str(src / "extra.safetensors"))
    before = tree_digest(src)
    result = _import(src, tmp_path / "out")
    assert result.exit_code == 2
    assert "model.layers.0.attn.mystery.weight" in result.output and "Traceback" not in result.output
    assert tree_digest(src) == before and not (tmp_path / "out").exists()


def test_sharded_directory_with_an_index_is_read(tmp_path):
    from dsv4cli.infer.safetensors_io import data_files, tensor_sources

    hf_model().save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = data_files(tmp_path / "sharded")
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sources = tensor_sources(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(sources) == set(index)


def test_output_inside_the_source_or_mtp_tensors_are_refused(hf_dir, tmp_path):
    from safetensors.torch import save_file

    inside = _import(hf_dir, hf_dir / "out")
    assert inside.exit_code == 2 and "never written" in inside.output
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    save_file({"mtp.0.enorm.weight": torch.ones(32)}, str(src / "mtp.safetensors"))
    mtp = _import(src, tmp_path / "out")  # an incomplete MTP depth (test_infer_import_layouts.py: a complete one)
    assert mtp.exit_code == 2 and "no source tensor for mtp.layers.0." in mtp.output


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny HF model, saved, then imported with `dsv4 import-hf --json`; the source's file digests
    before and after."""
    root = tmp_path_factory.mktemp("e2e")
    model = hf_model()
    model.save_pretrained(root / "hf")
    before = tree_digest(root / "hf")
    result = _import(root / "hf", root / "out", "--json")
    assert result.exit_code == 0, result.output
    return {"hf": model, "root": root, "before": before, "result": json.loads(result.stdout.strip().splitlines()[-1])}


PROMPT_LEN = 40  # 10 compressed sparse entries (ratio 4, top-2 chosen), 5 heavily compressed (ratio 8), window 8


def _prompt() -> list[int]:
    return torch.randint(2, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()


def test_imported_model_gives_hfs_logits(imported):
    from dsv4cli.build.parallel import single_process
    from dsv4cli.infer.generate import load_for_inference, logits_of
    from dsv4cli.spec.load import load_spec

    out = imported["root"] / "out"
    from dsv4cli.infer.safetensors_io import tensor_sources

    assert imported["result"]["tensors"] == len(tensor_sources(imported["root"] / "hf"))  # every tensor HF saved
    assert set(imported["result"]["dtypes"]) == {"float32", "int64"}  # fp32 stays fp32; the hash table int64
    spec = load_spec(out / "spec.toml")
    assert spec.model.mtp.depth == 0 and spec.data.eos_token_ids == [1]
    prompt = _prompt()
    with torch.no_grad():
        theirs = imported["hf"](torch.tensor([prompt])).logits[0]
    with single_process(spec, seed=0):
        ours = logits_of(load_for_inference(spec, str(out)), prompt, VOCAB)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert tree_digest(imported["root"] / "hf") == imported["before"]


def test_generate_continues_like_hf_generate(imported):
    from dsv4cli.cli import app

    prompt = _prompt()
    with torch.no_grad():
        theirs = imported["hf"].generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)[0, PROMPT_LEN:]
    out = imported["root"] / "out"
    result = CliRunner().invoke(app, ["generate", str(out / "spec.toml"), "--load", str(out), "--tokens",
                                      ",".join(map(str, prompt)), "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["tokens"] == theirs.tolist()
    assert got["text"] is None  # no tokenizer.json, and the byte placeholder cannot serve 64 tokens
    assert len(got["prompt_logprobs"]) == PROMPT_LEN - 1


def test_decoding_stops_at_the_eos_id_as_hf_does(imported):
    from dsv4cli.cli import app

    prompt = _prompt()
    hf = imported["hf"]
    with torch.no_grad():
        free = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)[0, PROMPT_LEN:].tolist()
        stop = next(i for i in range(1, 8) if free[i] not in free[:i])
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                             eos_token_id=free[stop])[0, PROMPT_LEN:].tolist()
    assert theirs == free[: stop + 1]
    out = imported["root"] / "out"
    result = CliRunner().invoke(app, ["generate", str(out / "spec.toml"), "--load", str(out), "--tokens",
                                      ",".join(map(str, prompt)), "--max-new-tokens", "8", "--json",
                                      "--set", f"data.eos_token_ids=[{free[stop]}]"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokens"] == theirs


def test_dtype_option_casts_floating_tensors_only_and_spec_out_points_at_the_checkpoint(imported, tmp_path):
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.infer.generate import Sampling, generate
    from dsv4cli.spec.load import load_spec

    spec_file = tmp_path / "specs" / "bf16.toml"
    result = _import(imported["root"] / "hf", tmp_path / "bf16", "--dtype", "bfloat16", "--spec-out", spec_file,
                     "--json")
    assert result.exit_code == 0, result.output
    stored = read_checkpoint_info(tmp_path / "bf16").tensors
    assert stored["embedding.word_embeddings.weight"].dtype == "bfloat16"
    assert stored["decoder.layers.0.mlp.router.tid2eid"].dtype == "int64"
    assert stored["decoder.hc_head_fn"].dtype == "float32"  # mHC / contraction stay fp32 (design.md §2)
    assert not (tmp_path / "bf16" / "spec.toml").exists()
    spec = load_spec(spec_file)
    assert Path(spec.checkpoint.dir) == (tmp_path / "bf16").resolve()
    out = generate(spec, spec.checkpoint.dir, _prompt(), Sampling(max_new_tokens=3))  # computes in bf16
    assert len(out["tokens"]) <= 3 and all(0 <= t < VOCAB for t in out["tokens"])


def test_interop_doc_lists_every_row_of_the_name_table():
    from dsv4cli.infer.hf_names import EXPERT_HOMES, TOP_LEVEL, layer_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "interop.md").read_text()
    for name, places in TOP_LEVEL.items():
        assert f"`{name}`" in doc and all(f"`{p.targets[0]}`" in doc for p in places), name
    for name, places in layer_table().items():
        assert f"`layers.N.{name}`" in doc, name
        assert all(f"`decoder.layers.N.{p.targets[0]}`" in doc for p in places), name
    for w in ("w1", "w2", "w3"):
        assert f"`layers.N.ffn.experts.E.{w}.weight`" in doc
    assert f"`decoder.layers.N.{EXPERT_HOMES[0].format(e='E', fc='linear_fc1')}`" in doc


def test_missing_or_misshaped_tensors_are_exit_2_naming_them(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != "model.layers.2.attn.compressor.ape"},
                    "decoder.layers.2.self_attention.compressor.position_bias"),
        "misshaped": ({**tensors, "model.layers.1.attn.wkv.weight": torch.zeros(8, 32)},
                      "model.layers.1.attn.wkv.weight [8, 32]"),
    }
    for case, (content, named) in cases.items():
        src = tmp_path / case
        src.mkdir()
        shutil.copy(hf_dir / "config.json", src / "config.json")
        save_file(content, str(src / "model.safetensors"))
        result = _import(src, tmp_path / f"{case}-out")
        assert result.exit_code == 2 and named in result.output, (case, result.output)
        assert not (tmp_path / f"{case}-out").exists()


def test_dsv4cli_never_imports_transformers():
    """Import and generate run dsv4's own model; transformers is optional (the `hf` extra): only
    --verify's model comparison imports it, inside its function (verify_model.py), never at module level."""
    import re

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^(\s*)(from|import)\s+transformers\b", re.M)
    found = {str(p.relative_to(root)): [m.group(1) for m in pattern.finditer(p.read_text(encoding="utf-8"))]
             for d in ("dsv4cli", "kernels") for p in (root / d).rglob("*.py")}
    offenders = {name: indents for name, indents in found.items() if indents}
    assert list(offenders) == ["dsv4cli/infer/verify_model.py"]
    assert all(indent for indent in offenders["dsv4cli/infer/verify_model.py"])  # lazily, inside functions


def test_config_reading_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, dsv4cli.infer.hf_config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
