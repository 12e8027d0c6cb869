"""`dsv4 import-hf` reads every layout a user meets: the tiny model of tests/test_infer_import_hf.py
written by these tests in the public release's original names (legacy config keys, `mtp.*` tensors,
FP8 e4m3 weights with block scales, FP4 experts with E8M0 scales) imports to the same dsv4 checkpoint
as HF's `save_pretrained` layout, with MTP depth 1, and bit-equal to transformers' own dequantization.

The tiny-model builder is tests/hf_tiny.py's (shared with the import and export tests)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_tiny import hf_model  # noqa: E402  (the tiny DeepseekV4ForCausalLM builder)

TOP_RENAMES = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
               "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
FP8_BLOCK = [8, 8]  # the release's is [128, 128]; the tiny model's weights are 16..64 wide
FP4_BLOCK = 16  # values per E8M0 scale along a row (transformers reads the block off the scale grid)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _import(*args):
    from dsv4cli.cli import app

    return CliRunner().invoke(app, ["import-hf", *map(str, args)])


def original_name(hf_name: str) -> str:
    """save_pretrained's name -> the release's (docs/interop.md: no `model.` prefix, `embed.weight`, `hc_head_fn`)."""
    short = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    return TOP_RENAMES.get(short, short)


def legacy_config(cfg: dict, mtp_ratio: int | None = None) -> dict:
    """transformers' config keys -> the release's (compress_ratios, num_hash_layers, rope_scaling, ...)."""
    out = {k: v for k, v in cfg.items() if k not in ("layer_types", "mlp_layer_types", "compress_rates",
                                                         "rope_parameters", "partial_rotary_factor")}
    rates = {"sliding_attention": 0, **cfg["compress_rates"]}
    ratios = [rates[t] for t in cfg["layer_types"]] + ([mtp_ratio] if mtp_ratio is not None else [])
    out.update(compress_ratios=ratios, num_hash_layers=cfg["mlp_layer_types"].count("hash_moe"),
               qk_rope_head_dim=8, rope_theta=cfg["rope_parameters"]["main"]["rope_theta"],
               compress_rope_theta=cfg["rope_parameters"]["compress"]["rope_theta"],
               rope_scaling={"type": "yarn", **{k: v for k, v in cfg["rope_parameters"]["compress"].items()
                                                if k in ("factor", "original_max_position_embeddings",
                                                         "beta_fast", "beta_slow")}},
               num_nextn_predict_layers=0 if mtp_ratio is None else 1)
    return out


def write_original(dst: Path, tensors: dict, cfg: dict) -> Path:
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def write_tokenizer(dst: Path, vocab: int = 64) -> None:
    """A word-level tokenizer.json of `vocab` tokens (`dsv4 eval` needs one that fits the vocabulary)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = {"</s>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    Tokenizer(WordLevel(words, unk_token="w1")).save(str(dst / "tokenizer.json"))


def mtp_tensors(hf: dict, g: torch.Generator) -> dict:
    """An MTP depth in the release's names: a copy (perturbed) of decoder layer 1's (CSA) block as `mtp.0.*`
    plus the depth's own projections, norms and contraction."""
    h, n = 32, 2
    out = {"mtp.0." + k[len("layers.1."):]: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)
           if v.is_floating_point() else v.clone()
           for k, v in hf.items() if k.startswith("layers.1.")}
    out.update({"mtp.0.e_proj.weight": 0.15 * torch.randn(h, h, generator=g),
                "mtp.0.h_proj.weight": 0.15 * torch.randn(h, h, generator=g),
                **{f"mtp.0.{k}.weight": 1 + 0.1 * torch.randn(h, generator=g) for k in ("enorm", "hnorm", "norm")},
                "mtp.0.hc_head_fn": 0.15 * torch.randn(n, n * h, generator=g),
                "mtp.0.hc_head_base": 0.5 * torch.randn(n, generator=g),
                "mtp.0.hc_head_scale": 0.5 * torch.randn(1, generator=g)})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny HF model saved by save_pretrained and imported; its tensors in original names; its config."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("layouts")
    hf_model().save_pretrained(root / "hf")
    result = _import(root / "hf", root / "hf-out", "--json")
    assert result.exit_code == 0, result.output
    tensors = {original_name(k): v for k, v in load_file(str(root / "hf" / "model.safetensors")).items()}
    cfg = json.loads((root / "hf" / "config.json").read_text())
    return {"root": root, "tensors": tensors, "cfg": cfg, "result": json.loads(result.stdout.strip().splitlines()[-1])}


def loaded(out: Path) -> dict:
    """The imported checkpoint's tensors (state-dict names), each loaded in its saved dtype."""
    from dsv4cli.build.parallel import single_process
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.infer.generate import load_for_inference
    from dsv4cli.spec.load import load_spec

    spec = load_spec(out / "spec.toml")
    with single_process(spec, seed=0):
        model = load_for_inference(spec, str(out))
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    stored = read_checkpoint_info(out).tensors
    for name, value in state.items():
        entry = stored.get(re.sub(r"experts\.local_experts\.\d+\.", "experts.experts.", name))  # stacked experts
        assert entry is not None or not value.is_floating_point(), name
        if value.is_floating_point():  # the model loads in one dtype: back to the saved one
            assert value.to(getattr(torch, entry.dtype)).to(value.dtype).equal(value), name
            state[name] = value.to(getattr(torch, entry.dtype))
    return state


def test_original_layout_imports_to_the_same_checkpoint_as_save_pretrained(tiny):
    root = tiny["root"]
    src = write_original(root / "original", tiny["tensors"], legacy_config(tiny["cfg"]))
    result = _import(src, root / "original-out", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert (got["layout"], tiny["result"]["layout"]) == ("original", "hf")
    assert got["mtp_depth"] == 0 and got["dequantized"] == 0 and got["dtypes"] == tiny["result"]["dtypes"]
    ours, theirs = loaded(root / "original-out"), loaded(root / "hf-out")
    assert ours.keys() == theirs.keys() and len(ours) > 100
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not ours[k].equal(theirs[k])]
    assert differ == []


def test_hf_in_memory_module_names_import_to_the_same_checkpoint(tiny, monkeypatch):
    """The names of HF's modules (`self_attn.q_a_proj`, fused `mlp.experts.gate_up_proj` [E, 2I, h], ...),
    as an older or newer transformers may save them. Every byte of the source is read exactly once: a
    fused expert tensor one expert's slice at a time, never whole."""
    from safetensors.torch import save_file

    import dsv4cli.infer.safetensors_io as safetensors_io

    reads, real = [], safetensors_io.read_tensor

    def counted(path, name, element=None):
        tensor = real(path, name, element)
        reads.append((name, element, tensor.nbytes))
        return tensor

    monkeypatch.setattr(safetensors_io, "read_tensor", counted)

    root = tiny["root"]
    src = root / "modules"
    src.mkdir()
    (src / "config.json").write_text((root / "hf" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf_model().state_dict().items()}  # the model save_pretrained wrote
    assert "model.layers.1.mlp.experts.gate_up_proj" in state and "model.layers.1.self_attn.sinks" in state
    save_file(state, str(src / "model.safetensors"))
    result = _import(src, root / "modules-out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["layout"] == "hf-modules"
    keys = [(name, element) for name, element, _ in reads]
    assert len(keys) == len(set(keys)) and set(name for name, _ in keys) == set(state)
    fused = {name for name, element in keys if element is not None}
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused and (("model.layers.1.mlp.experts.down_proj", None)
                                                                   not in keys)
    assert sum(n for *_, n in reads) == sum(v.nbytes for v in state.values())
    ours, theirs = loaded(root / "modules-out"), loaded(root / "hf-out")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k].dtype != theirs[k].dtype or not ours[k].equal(theirs[k])] == []


def test_original_layout_with_mtp_tensors_imports_mtp_depth_1_and_eval_reports_its_loss(tiny, tmp_path):
    from dsv4cli.cli import app
    from dsv4cli.spec.load import load_spec

    g = torch.Generator().manual_seed(3)
    mtp = mtp_tensors(tiny["tensors"], g)
    src = write_original(tmp_path / "mtp", {**tiny["tensors"], **mtp}, legacy_config(tiny["cfg"], mtp_ratio=4))
    write_tokenizer(src)
    result = _import(src, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["mtp_depth"] == 1
    spec = load_spec(tmp_path / "out" / "spec.toml")
    assert spec.model.mtp.depth == 1
    assert spec.model.attention.layer_types[-1] == "csa"  # the MTP layer's compress_ratios entry (4)
    state = loaded(tmp_path / "out")
    inner = "mtp.layers.0.transformer_layer."
    pairs = {"mtp.layers.0.e_proj.weight": mtp["mtp.0.e_proj.weight"],
             "mtp.layers.0.final_layernorm.weight": mtp["mtp.0.norm.weight"],
             "mtp.layers.0.hc_head_fn": mtp["mtp.0.hc_head_fn"],
             inner + "self_attention.linear_kv.weight": mtp["mtp.0.attn.wkv.weight"],
             inner + "self_attention.sinks": mtp["mtp.0.attn.attn_sink"],
             inner + "mlp_hyper_connection.alpha_res": mtp["mtp.0.hc_ffn_scale"][2:],
             inner + "mlp.experts.local_experts.1.linear_fc1.weight":
                 torch.cat([mtp["mtp.0.ffn.experts.1.w1.weight"], mtp["mtp.0.ffn.experts.1.w3.weight"]])}
    assert [k for k, v in pairs.items() if not state[k].equal(v)] == []
    ev = CliRunner().invoke(app, ["eval", str(tmp_path / "out" / "spec.toml"), "--load", str(tmp_path / "out"),
                                  "--set", "model.seq_length=32", "--set", "train.global_batch_size=1",
                                  "--batches", "1", "--json"])
    assert ev.exit_code == 0, ev.output
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert len(out["mtp_losses"]) == 1 and math.isfinite(out["mtp_losses"][0]) and out["mtp_losses"][0] > 0


def test_toy_variant_keeps_the_first_layers_and_experts_and_trains_on_cpu(tiny, tmp_path):
    """--layers 2 --experts 2 on an original-layout source with an MTP depth: 2 layers + MTP, 2 experts
    everywhere (router rows cut, hash ids modulo 2), a note in the spec; 2 training steps from it."""
    from dsv4cli.cli import app
    from dsv4cli.spec.load import load_spec

    src_tensors = {**tiny["tensors"], **mtp_tensors(tiny["tensors"], torch.Generator().manual_seed(4))}
    cfg = {**legacy_config(tiny["cfg"], mtp_ratio=4), "max_position_embeddings": 32}  # model.seq_length 32
    src = write_original(tmp_path / "src", src_tensors, cfg)
    write_tokenizer(src)
    result = _import(src, tmp_path / "toy", "--layers", "2", "--experts", "2", "--json")
    assert result.exit_code == 0, result.output
    spec_text = (tmp_path / "toy" / "spec.toml").read_text()
    assert "# toy variant: the first 2 of 3 layers" in spec_text
    spec = load_spec(tmp_path / "toy" / "spec.toml")
    assert (spec.model.num_layers, spec.model.moe.num_experts, spec.model.moe.top_k, spec.model.mtp.depth) == (2, 2, 2, 1)
    assert spec.model.seq_length == 32
    assert spec.model.attention.layer_types == ["sliding", "csa", "csa"]  # the MTP layer's entry kept
    state = loaded(tmp_path / "toy")
    assert state["decoder.layers.1.mlp.router.weight"].equal(src_tensors["layers.1.ffn.gate.weight"][:2])
    assert state["mtp.layers.0.transformer_layer.mlp.router.expert_bias"].equal(src_tensors["mtp.0.ffn.gate.bias"][:2])
    assert state["decoder.layers.0.mlp.router.tid2eid"][:64].equal(src_tensors["layers.0.ffn.gate.tid2eid"] % 2)
    assert not any(".local_experts.2." in k for k in state)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(tmp_path / "toy" / "spec.toml"), "--set", f"checkpoint.load={tmp_path / 'toy'}",
                                 "--set", f"checkpoint.dir={run}", "--set", "train.steps=2",
                                 "--set", "train.global_batch_size=1", "--set", "train.eval_interval=0"])
    assert r.exit_code == 0, r.output
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) >= 1 and all(math.isfinite(x) for x in losses)


def fp8_quantize(w: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[r, c] -> (e4m3 [r, c], fp32 scales [ceil(r/bm), ceil(c/bn)]): block amax / 448, power-of-two
    scales (the release's ue8m0 format)."""
    bm, bn = block
    gr, gc = math.ceil(w.shape[0] / bm), math.ceil(w.shape[1] / bn)
    amax = torch.zeros(gr, gc)
    for i in range(gr):
        for j in range(gc):
            amax[i, j] = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].abs().max()
    scale = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-12) / 448.0)))
    full = scale.repeat_interleave(bm, 0)[: w.shape[0]].repeat_interleave(bn, 1)[:, : w.shape[1]]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[r, c] -> (int8 [r, c/2]: two e2m1 codes a byte, low nibble first; uint8 E8M0 scales [r, c/16])."""
    r, c = w.shape
    blocks = w.reshape(r, c // FP4_BLOCK, FP4_BLOCK)
    exp = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-12) / 6.0))
    codes = ((blocks / torch.exp2(exp)[..., None]).reshape(r, c)[..., None] - E2M1).abs().argmin(-1).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), (exp + 127).to(torch.uint8)


def quantized_release(tensors: dict) -> dict:
    """The release's storage: FP8 (`.scale`: E8M0 for attention, fp32 elsewhere) for 2-D projections, FP4
    for the routed experts, the rest as is."""
    out = {}
    for name, value in tensors.items():
        keep = value.dim() != 2 or not name.endswith(".weight") or name in ("embed.weight", "head.weight") \
            or name.endswith("ffn.gate.weight")
        if keep:
            out[name] = value
        elif ".ffn.experts." in name:
            out[name], out[name[: -len(".weight")] + ".scale"] = fp4_quantize(value)
        else:
            q, scale = fp8_quantize(value, FP8_BLOCK)
            e8m0 = ".attn." in name  # the release's ue8m0 scales as F8_E8M0; fp32 ones elsewhere
            out[name], out[name[: -len(".weight")] + ".scale"] = q, scale.to(torch.float8_e8m0fnu) if e8m0 else scale
    return out


def test_fp8_and_fp4_weights_import_bit_equal_to_transformers_dequantization(tiny):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from dsv4cli.ckpt.metadata import read_checkpoint_info

    root = tiny["root"]
    stored = quantized_release(tiny["tensors"])
    cfg = {**legacy_config(tiny["cfg"]), "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": FP8_BLOCK}}
    src = write_original(root / "fp8", stored, cfg)
    result = _import(src, root / "fp8-out", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    scales = [k for k in stored if k.endswith(".scale")]
    assert got["dequantized"] == len(scales) > 50 and got["tensors"] == len(stored) - len(scales)
    state = loaded(root / "fp8-out")
    theirs = Fp8Dequantize(None)

    def reference(name: str) -> torch.Tensor:
        scale = stored[name[: -len(".weight")] + ".scale"]
        return theirs._dequantize_one(stored[name], scale, output_dtype=torch.bfloat16)

    checks = {"decoder.layers.1.self_attention.linear_q_down.weight": reference("layers.1.attn.wq_a.weight"),
              "decoder.layers.2.self_attention.compressor.linear_kv.weight":
                  reference("layers.2.attn.compressor.wkv.weight"),
              "decoder.layers.1.mlp.shared_experts.linear_fc2.weight": reference("layers.1.ffn.shared_experts.w2.weight"),
              "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight":
                  torch.cat([reference("layers.0.ffn.experts.3.w1.weight"), reference("layers.0.ffn.experts.3.w3.weight")]),
              "decoder.layers.2.mlp.experts.local_experts.0.linear_fc2.weight": reference("layers.2.ffn.experts.0.w2.weight")}
    assert [k for k, v in checks.items() if state[k].dtype != torch.bfloat16 or not state[k].equal(v)] == []
    # the quantization is real (not a copy of the fp32 weights) and the dequantization close to them
    wq_a = tiny["tensors"]["layers.1.attn.wq_a.weight"]
    assert 0 < (checks["decoder.layers.1.self_attention.linear_q_down.weight"].float() - wq_a).abs().max() < 0.1
    saved = read_checkpoint_info(root / "fp8-out").tensors
    assert saved["decoder.layers.1.self_attention.sinks"].dtype == "float32"  # unquantized: source dtype
    assert saved["decoder.layers.0.mlp.router.tid2eid"].dtype == "int64"  # integer tables stay integer
    assert saved["embedding.word_embeddings.weight"].dtype == "float32"
    assert saved["decoder.layers.2.self_attention.linear_o_up.weight"].dtype == "bfloat16"


def test_dtype_cast_leaves_the_fp32_tensors_fp32_and_exact(tiny):
    """--dtype bfloat16 casts the projections; sinks, position biases, the expert bias and the mHC
    parameters keep their fp32 source values bit for bit (never rounded through bf16)."""
    root = tiny["root"]
    result = _import(root / "hf", root / "bf16-out", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    state, src = loaded(root / "bf16-out"), tiny["tensors"]
    exact = {"decoder.layers.1.self_attention.sinks": src["layers.1.attn.attn_sink"],
             "decoder.layers.2.self_attention.compressor.position_bias": src["layers.2.attn.compressor.ape"],
             "decoder.layers.1.mlp.router.expert_bias": src["layers.1.ffn.gate.bias"],
             "decoder.layers.0.mlp_hyper_connection.bias": src["layers.0.hc_ffn_base"],
             "decoder.hc_head_fn": src["hc_head_fn"]}
    assert [k for k, v in exact.items() if state[k].dtype != torch.float32 or not state[k].equal(v)] == []
    assert state["decoder.layers.1.self_attention.linear_kv.weight"].dtype == torch.bfloat16


def test_block_scales_with_partial_last_blocks_follow_the_128_grid():
    """A [200, 130] FP8 weight has a [2, 2] grid of 128 x 128 blocks; the last ones are partial."""
    from dsv4cli.infer.dequant import dequantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 130, generator=g)
    q, scale = fp8_quantize(w, [128, 128])
    assert tuple(scale.shape) == (2, 2)
    ours = dequantize(q, scale, torch.float32, (128, 128))
    rows = torch.arange(200)[:, None] // 128
    cols = torch.arange(130)[None, :] // 128
    assert ours.equal(q.float() * scale[rows, cols])
    assert (ours - w).abs().max() < 0.1 * w.abs().max()


def test_bad_quantized_or_unknown_original_tensors_are_exit_2_naming_them(tiny, tmp_path):
    cfg = legacy_config(tiny["cfg"])
    q, s = fp8_quantize(tiny["tensors"]["layers.0.attn.wq_a.weight"], FP8_BLOCK)
    cases = {
        "unknown": ({"mtp.0.mystery.weight": torch.zeros(2)}, "mtp.0.mystery.weight"),
        "unscaled": ({"layers.0.attn.wq_a.weight": q}, "layers.0.attn.wq_a.weight"),
        "orphan": ({"layers.0.attn.nothing.weight_scale_inv": s}, "layers.0.attn.nothing.weight_scale_inv"),
        "unknown scale": ({"layers.0.attn.nothing.scale": s}, "layers.0.attn.nothing.scale"),
        "mixed": ({"model.layers.0.attn.wq_a.weight": q}, "mix layouts"),
        "misfit grid": ({"layers.0.attn.wq_a.weight": q, "layers.0.attn.wq_a.scale": torch.ones(5, 7)},
                        "layers.0.attn.wq_a.scale"),
    }
    for case, (extra, named) in cases.items():
        src = write_original(tmp_path / case, {**tiny["tensors"], **extra}, cfg)
        result = _import(src, tmp_path / f"{case}-out")
        assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output, (case, result.output)
        assert not (tmp_path / f"{case}-out").exists()


def test_failures_inside_the_streaming_writer_are_one_line_and_leave_nothing(tiny, tmp_path, monkeypatch):
    """An input error met while DCP's writer asks for a tensor (here: a scale grid the header check was
    told to let through) is exit 2 in one line; any other error there exit 1 in one line; OUT never
    appears, nor its hidden work directory."""
    import dsv4cli.infer.import_hf as import_hf

    q, _ = fp8_quantize(tiny["tensors"]["layers.0.attn.wq_a.weight"], FP8_BLOCK)
    bad = {**tiny["tensors"], "layers.0.attn.wq_a.weight": q, "layers.0.attn.wq_a.scale": torch.ones(5, 7)}
    src = write_original(tmp_path / "bad", bad, legacy_config(tiny["cfg"]))
    monkeypatch.setattr(import_hf, "check_scale_grid", lambda source, block: None)
    result = _import(src, tmp_path / "bad-out", "--json")
    assert result.exit_code == 2 and "layers.0.attn.wq_a.weight" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output

    def broken(self, source, dtype, element=None):
        raise RuntimeError("the disk went away\nsecond line")

    monkeypatch.setattr(import_hf.SourceReader, "__call__", broken)
    result = _import(tiny["root"] / "hf", tmp_path / "broken-out", "--json")
    assert result.exit_code == 1 and "RuntimeError: second line" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_interop_doc_lists_the_mtp_rows():
    from dsv4cli.infer.hf_names import MTP_TABLE

    doc = (Path(__file__).resolve().parents[1] / "docs" / "interop.md").read_text()
    for name, places in MTP_TABLE.items():
        assert f"`mtp.K.{name}`" in doc and all(f"`mtp.layers.K.{p.targets[0]}`" in doc for p in places), name
