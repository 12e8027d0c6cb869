"""[model.attention] and the DeepSeek-V4 MoE keys: schema, per-layer lists and their rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv4cli.spec.load import resolve_spec as load_spec
from dsv4cli.spec.rules import check_rules, check_supported, UnsupportedSpecError
from dsv4cli.spec.schema import AttentionSpec

BASE = """\
name = "t"
[model]
num_layers = 3
hidden_size = 64
num_attention_heads = 4
ffn_hidden_size = 128
vocab_size = 256
seq_length = 64
[model.mtp]
depth = 1
[model.attention]
layer_types = ["sliding", "csa", "hca", "csa"]
head_dim = 32
rope_head_dim = 8
q_lora_rank = 16
o_groups = 2
o_lora_rank = 16
sliding_window = 8
index_n_heads = 2
index_head_dim = 8
index_topk = 4
compress_ratios = [0, 4, 16, 4]
[train]
global_batch_size = 1
micro_batch_size = 1
[data]
source = "mock"
"""


def _problems(tmp_path: Path, text: str, *overrides: str) -> list:
    path = tmp_path / "s.toml"
    path.write_text(text)
    spec = load_spec(str(path), list(overrides))
    return check_rules(spec)


def _messages(problems, severity=None) -> list[str]:
    return [p.message for p in problems if severity is None or p.severity == severity]


def test_valid_attention_spec_has_no_problems(tmp_path):
    problems = _problems(tmp_path, BASE)
    assert problems == [], _messages(problems)


def test_layer_list_must_cover_decoder_layers_and_mtp(tmp_path):
    errors = _messages(_problems(tmp_path, BASE, "model.mtp.depth=2"), "error")
    assert any("has 4 entries" in e and "3 + 2 = 5" in e for e in errors), errors


def test_ratio_must_match_the_kind(tmp_path):
    text = BASE.replace("compress_ratios = [0, 4, 16, 4]", "compress_ratios = [4, 4, 1, 4]")
    errors = _messages(_problems(tmp_path, text), "error")
    assert any("layer 0 is 'sliding'" in e and "= 4" in e for e in errors), errors
    assert any("layer 2 is 'hca'" in e and "= 1" in e for e in errors), errors


def test_default_ratios_follow_the_release():
    a = AttentionSpec(layer_types=["sliding", "csa", "hca"])
    assert a.ratios() == [0, 4, 128]
    assert AttentionSpec(layer_types=["csa"], compress_ratios=[8]).ratios() == [8]


def test_topk_that_selects_everything_warns(tmp_path):
    warnings = _messages(_problems(tmp_path, BASE, "model.attention.index_topk=16"), "warning")
    assert any("index_topk (16) selects every compressed entry" in w for w in warnings), warnings


def test_sequence_shorter_than_a_ratio_warns(tmp_path):
    warnings = _messages(_problems(tmp_path, BASE, "model.seq_length=8", "model.attention.index_topk=1"), "warning")
    assert any("shorter than the compression ratio 16" in w for w in warnings), warnings


def test_tensor_parallel_attention_is_accepted_when_heads_groups_and_indexer_heads_divide(tmp_path):
    problems = _problems(tmp_path, BASE, "parallel.tp=2", "launch.nproc_per_node=2")
    assert problems == [], _messages(problems)


@pytest.mark.parametrize("key, value", [("model.attention.o_groups", 1), ("model.attention.index_n_heads", 3)])
def test_tensor_parallel_attention_that_does_not_divide_is_refused_naming_the_key(tmp_path, key, value):
    problems = _problems(tmp_path, BASE, "parallel.tp=2", "launch.nproc_per_node=2", f"{key}={value}")
    errors = [p for p in problems if p.severity == "error"]
    assert any(p.key in (key, "parallel.tp") and f"parallel.tp (2) does not divide {key} ({value})" in p.message
               for p in errors), _messages(problems)


def test_o_groups_must_divide_heads(tmp_path):
    errors = _messages(_problems(tmp_path, BASE, "model.attention.o_groups=3"), "error")
    assert any("o_groups (3) does not divide model.num_attention_heads (4)" in e for e in errors), errors


def test_unknown_layer_type_is_a_schema_error(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(BASE.replace('"hca", "csa"]', '"hca", "dense"]'))
    with pytest.raises(Exception) as err:
        load_spec(str(path), [])
    assert "layer_types" in str(err.value)


def test_builder_accepts_attention(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(BASE)
    check_supported(load_spec(str(path), []))  # built (dsv4cli/build/dsv4_specs.py): nothing refused


MOE = """
[model.moe]
num_experts = 4
top_k = 2
expert_ffn_hidden_size = 32
hash_layers = 2
"""


def test_hash_layers_must_be_on_a_pipeline_rank_that_reads_batches(tmp_path):
    """Only the first and the last pipeline rank have the token ids (embedding; loss and MTP)."""
    text = BASE.replace("num_layers = 3", "num_layers = 4").replace(
        '["sliding", "csa", "hca", "csa"]', '["sliding", "csa", "hca", "csa", "hca"]').replace(
        "compress_ratios = [0, 4, 16, 4]", "") + MOE
    problems = _problems(tmp_path, text, "parallel.pp=2", "launch.nproc_per_node=2", "model.mtp.depth=1")
    assert not any("hash-routed decoder layer" in m for m in _messages(problems, "error")), _messages(problems)
    # pp = 2: both ranks read batches, so a hash layer on the second stage is fine
    problems = _problems(tmp_path, text.replace("hash_layers = 2", "hash_layers = 3"),
                         "parallel.pp=2", "launch.nproc_per_node=2")
    assert not any("hash-routed decoder layer" in m for m in _messages(problems, "error")), _messages(problems)
    four = ["parallel.pp=4", "launch.nproc_per_node=4"]
    assert not any("hash-routed decoder layer" in m for m in _messages(_problems(
        tmp_path, text.replace("hash_layers = 2", "hash_layers = 1"), *four), "error"))
    problems = _problems(tmp_path, text, *four)
    assert any("hash-routed decoder layer 1 sits on pipeline rank 1 of 4, which has no token ids" in m
               for m in _messages(problems, "error")), _messages(problems)


def test_rope_dims_must_fit_the_indexer_head_too(tmp_path):
    errors = _messages(_problems(tmp_path, BASE, "model.attention.index_head_dim=4"), "error")
    assert any("rope_head_dim (8) must be even and at most head_dim (32) and index_head_dim (4)" in e
               for e in errors), errors


def test_selective_moe_recompute_with_hash_routing_is_refused_at_validation(tmp_path):
    text = BASE + MOE.replace("hash_layers = 2", "hash_layers = 1\nscore_function = \"sqrtsoftplus\"")
    problems = _problems(tmp_path, text, 'train.recompute=["moe"]')
    assert any(p.key == "train.recompute" and "selective 'moe' recompute" in p.message for p in problems), \
        _messages(problems)
