"""`dsv4 export-hf`: a tiny HF DeepseekV4ForCausalLM, saved, imported and exported again, gives back
every tensor bit for bit (names, dtypes, values) and a config.json equal to the source's; HF loads
the export with identical logits; a fine-tuned imported checkpoint exports and HF runs it with
dsv4's logits; bad input is exit 2 and the checkpoint is never written to."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_tiny import VOCAB, hf_model, safetensors_dir_tensors, tree_digest  # noqa: E402  (after importorskip)

PROMPT = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))


def _cli(*args):
    from dsv4cli.cli import app

    return CliRunner().invoke(app, [*map(str, args)])


def _last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """tiny HF model -> save_pretrained -> import-hf -> export-hf (40 KB shards); digests of the
    imported checkpoint before and after the export."""
    root = tmp_path_factory.mktemp("export")
    model = hf_model()
    model.save_pretrained(root / "hf")
    _last_json(_cli("import-hf", root / "hf", root / "imported", "--json"))
    before = tree_digest(root / "imported")
    result = _last_json(_cli("export-hf", root / "imported", root / "exported", "--max-shard-size", "40KB", "--json"))
    return {"hf": model, "root": root, "result": result, "before": before}


def test_import_then_export_gives_back_every_tensor_bit_for_bit(chain):
    root = chain["root"]
    source, exported = safetensors_dir_tensors(root / "hf"), safetensors_dir_tensors(root / "exported")
    assert sorted(exported) == sorted(source)
    changed = [n for n, t in source.items()
               if exported[n].dtype != t.dtype or exported[n].shape != t.shape or not torch.equal(exported[n], t)]
    assert changed == []
    assert source["model.layers.0.ffn.gate.tid2eid"].dtype == torch.int64  # the hash table stays integer
    assert chain["result"]["dtypes"] == {"float32": len(source) - 1, "int64": 1}
    index = json.loads((root / "exported" / "model.safetensors.index.json").read_text())
    assert chain["result"]["shards"] == len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_parameters"] == sum(p.numel() for p in chain["hf"].parameters())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    assert tree_digest(root / "imported") == chain["before"]  # CKPT is only read


def test_hf_loads_the_export_and_gives_identical_logits(chain):
    from transformers import DeepseekV4ForCausalLM

    reloaded = DeepseekV4ForCausalLM.from_pretrained(chain["root"] / "exported").float().eval()
    with torch.no_grad():
        ours, theirs = reloaded(PROMPT).logits, chain["hf"](PROMPT).logits
    assert torch.equal(ours, theirs)


def test_config_json_equals_the_source_field_by_field(chain):
    """With the source config kept by import-hf, every field; from the spec alone (no kept config),
    every field that shapes the computation."""
    from dsv4cli.infer.hf_config_out import PASSED_THROUGH, config_from_spec
    from dsv4cli.spec.load import load_spec

    root = chain["root"]
    source = json.loads((root / "hf" / "config.json").read_text())
    exported = json.loads((root / "exported" / "config.json").read_text())
    assert {k: (v, exported.get(k)) for k, v in source.items() if exported.get(k) != v} == {}
    assert sorted(exported) == sorted(source)
    assert (root / "exported" / "generation_config.json").read_text() == (root / "hf" / "generation_config.json").read_text()
    alone = config_from_spec(load_spec(root / "imported" / "spec.toml"), "float32")
    computed = [k for k in source if k not in PASSED_THROUGH]
    assert {k: (source[k], alone.get(k)) for k in computed if alone.get(k) != source[k]} == {}


def test_bf16_export_keeps_the_fp32_tensors_and_integer_tables(chain, tmp_path):
    result = _last_json(_cli("export-hf", chain["root"] / "imported", tmp_path / "bf16", "--dtype", "bf16", "--json"))
    tensors = safetensors_dir_tensors(tmp_path / "bf16")
    assert result["shards"] == 1 and (tmp_path / "bf16" / "model.safetensors").is_file()
    kept = {n for n, t in tensors.items() if t.dtype == torch.float32}
    assert {"model.layers.0.attn.attn_sink", "model.layers.1.attn.compressor.ape", "model.hc_head.hc_fn",
            "model.layers.2.hc_ffn_scale", "model.layers.1.ffn.gate.bias"} <= kept
    assert tensors["model.layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    rest = {t.dtype for n, t in tensors.items() if n not in kept and n != "model.layers.0.ffn.gate.tid2eid"}
    assert rest == {torch.bfloat16} and "model.layers.1.ffn.experts.0.w1.weight" not in kept
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_import_exports_bf16_bit_for_bit(chain, tmp_path):
    """import-hf --dtype bfloat16 stores bf16, except what the model keeps fp32 (mHC, sinks, norms:
    never rounded through bf16) and the int64 table; experts are stored stacked. The export keeps
    exactly those dtypes and values."""
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.infer.export_hf import STACKED_EXPERTS
    from dsv4cli.infer.hf_names import placements

    root = chain["root"]
    _last_json(_cli("import-hf", root / "hf", tmp_path / "imported", "--dtype", "bfloat16", "--json"))
    _last_json(_cli("export-hf", tmp_path / "imported", tmp_path / "exported", "--json"))
    source, exported = safetensors_dir_tensors(root / "hf"), safetensors_dir_tensors(tmp_path / "exported")
    assert sorted(exported) == sorted(source)
    stored = read_checkpoint_info(tmp_path / "imported").tensors

    def stored_dtype(name):
        keys = [k for t in placements(name)[0].targets for k in (t, STACKED_EXPERTS.sub(".experts.", t))]
        return getattr(torch, next(stored[k].dtype for k in keys if k in stored))

    kinds = {n: stored_dtype(n) for n in source}
    assert kinds["model.layers.1.ffn.experts.3.w2.weight"] == torch.bfloat16
    assert kinds["model.layers.1.hc_attn_fn"] == torch.float32 and kinds["model.layers.0.ffn.gate.tid2eid"] == torch.int64
    changed = [n for n, t in source.items() if exported[n].dtype != kinds[n] or not torch.equal(exported[n], t.to(kinds[n]))]
    assert changed == []
    # export --dtype bf16 of the fp32 import casts exactly as import --dtype bfloat16 did
    _last_json(_cli("export-hf", root / "imported", tmp_path / "cast", "--dtype", "bf16", "--json"))
    cast = safetensors_dir_tensors(tmp_path / "cast")
    assert [n for n, t in cast.items() if t.dtype != exported[n].dtype or not torch.equal(t, exported[n])] == []


def test_bad_input_is_exit_2_and_nothing_is_written(chain, tmp_path):
    imported = chain["root"] / "imported"
    missing = _cli("export-hf", tmp_path / "nothing", tmp_path / "a")
    assert missing.exit_code == 2 and "no such checkpoint" in missing.output and "Traceback" not in missing.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    taken = _cli("export-hf", imported, busy)
    assert taken.exit_code == 2 and "not an empty directory" in taken.output
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    for option, said in ((["--layout", "release"], "--layout"), (["--dtype", "fp4"], "--dtype"),
                         (["--max-shard-size", "lots"], "--max-shard-size")):
        refused = _cli("export-hf", imported, tmp_path / "b", *option)
        assert refused.exit_code == 2 and said in refused.output, refused.output
    inside = _cli("export-hf", imported, imported / "hf")
    assert inside.exit_code == 2 and "never written" in inside.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert tree_digest(imported) == chain["before"]


@pytest.mark.slow
def test_finetuned_import_exports_and_hf_runs_it_with_dsv4s_logits(tmp_path):
    """import -> `dsv4 train --set checkpoint.load=IMPORTED` (3 steps) -> export-hf -> HF's model gives
    the fine-tuned dsv4 model's logits (vocab 256 for the spec's byte tokenizer; max_position 64 makes
    the imported spec's seq_length 64)."""
    from transformers import DeepseekV4ForCausalLM

    from dsv4cli.build.parallel import single_process
    from dsv4cli.infer.generate import load_for_inference, logits_of
    from dsv4cli.spec.load import load_spec

    hf_model(vocab_size=256, max_position_embeddings=64).save_pretrained(tmp_path / "hf")
    _last_json(_cli("import-hf", tmp_path / "hf", tmp_path / "imported", "--json"))
    spec_file = tmp_path / "imported" / "spec.toml"
    trained = _cli("train", spec_file, "--set", f"checkpoint.load={tmp_path / 'imported'}",
                   "--set", f"checkpoint.dir={tmp_path / 'ft'}", "--set", "train.steps=3",
                   "--set", "train.global_batch_size=1", "--set", "train.warmup_steps=1")
    assert trained.exit_code == 0, trained.output
    result = _last_json(_cli("export-hf", tmp_path / "ft", tmp_path / "exported", "--json"))
    assert result["checkpoint"].endswith("iter_0000003")
    assert result["config_source"] == str(tmp_path / "imported" / "hf_config.json")  # found through checkpoint.load
    before, after = safetensors_dir_tensors(tmp_path / "hf"), safetensors_dir_tensors(tmp_path / "exported")
    assert not torch.equal(before["model.layers.1.attn.wq_a.weight"], after["model.layers.1.attn.wq_a.weight"])
    prompt = PROMPT[0].tolist()
    reloaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "exported").float().eval()
    with torch.no_grad():
        theirs = reloaded(torch.tensor([prompt])).logits[0]
    spec = load_spec(tmp_path / "ft" / "iter_0000003" / "dsv4_spec.toml", rules=False)
    with single_process(spec, seed=0):
        ours = logits_of(load_for_inference(spec, str(tmp_path / "ft")), prompt, 256)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_both_commands_take_the_same_dtype_spellings():
    """import-hf and export-hf read --dtype through one table: fp32/bf16/fp16 and torch's names alike."""
    from dsv4cli.commands.infer_cmds import _dtype_name

    assert _dtype_name("bf16") == _dtype_name("bfloat16") == "bfloat16"
    assert _dtype_name("fp32") == _dtype_name("float32") == "float32"
    assert _dtype_name(None) is None
