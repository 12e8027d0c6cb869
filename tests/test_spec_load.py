"""Spec loading: extends merge and path resolution, --set parsing and precedence, line numbers."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app
from dsv4cli.spec.load import SpecError, load_spec, locate, parse_override, spec_to_toml
from dsv4cli.spec.toml_lines import key_lines

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "specs" / "tiny.toml"
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}

BASE = """\
name = "base"
[model]
num_layers = 2
hidden_size = 64
num_attention_heads = 4
ffn_hidden_size = 128
vocab_size = 256
seq_length = 32
[model.mhc]
streams = 4
sinkhorn_iterations = 7
[train]
recompute = ["mhc", "mlp"]
global_batch_size = 4
micro_batch_size = 2
[data]
source = "mock"
tokenizer = "tok/tokenizer.json"
paths = ["corpus/a", "corpus/b"]
weights = [1.0, 2.0]
[checkpoint]
dir = "runs/base"
"""


@pytest.fixture
def chain(tmp_path):
    """base.toml in base/ (with a tokenizer file there), derived.toml in derived/ extending it."""
    (tmp_path / "base" / "tok").mkdir(parents=True)
    (tmp_path / "base" / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "base" / "base.toml").write_text(BASE)
    (tmp_path / "derived").mkdir()
    derived = tmp_path / "derived" / "derived.toml"
    derived.write_text(
        'extends = "../base/base.toml"\n'
        'name = "derived"\n'
        "[model.mhc]\n"
        "streams = 2\n"
        "[train]\n"
        'recompute = ["mlp"]\n'
        "[checkpoint]\n"
        'dir = "out"\n'
    )
    return tmp_path, derived


def test_extends_merges_tables_key_by_key_and_replaces_arrays(chain):
    tmp_path, derived = chain
    spec = load_spec(derived)
    assert spec.name == "derived"
    assert spec.model.mhc.streams == 2  # overridden
    assert spec.model.mhc.sinkhorn_iterations == 7  # kept from the base's same table
    assert spec.model.hidden_size == 64
    assert spec.train.recompute == ["mlp"]  # array replaced whole, not merged
    assert spec.train.global_batch_size == 4
    assert spec.extends is None


def test_relative_paths_resolve_against_the_file_that_sets_them(chain):
    tmp_path, derived = chain
    spec = load_spec(derived)
    assert spec.data.tokenizer == str(tmp_path / "base" / "tok" / "tokenizer.json")
    assert spec.data.paths == [str(tmp_path / "base" / "corpus" / "a"), str(tmp_path / "base" / "corpus" / "b")]
    assert spec.checkpoint.dir == str(tmp_path / "derived" / "out")


def test_extends_chain_of_three_files(chain):
    tmp_path, derived = chain
    top = tmp_path / "top.toml"
    top.write_text('extends = "derived/derived.toml"\n[model]\nnum_layers = 4\n')
    spec = load_spec(top)
    assert (spec.model.num_layers, spec.model.mhc.streams, spec.model.mhc.sinkhorn_iterations) == (4, 2, 7)
    assert spec.name == "derived"  # set by the middle file; the stem is only the default


def test_origins_point_at_the_file_and_line_that_set_each_key(chain):
    tmp_path, derived = chain
    spec = load_spec(derived)
    assert locate(spec, "model.mhc.streams")[1] == 4
    assert locate(spec, "model.mhc.streams")[0].endswith("derived.toml")
    assert locate(spec, "model.hidden_size")[0].endswith("base.toml")
    assert locate(spec, "model.hidden_size")[1] == 4
    assert locate(spec, "train.recompute") == (locate(spec, "train.recompute")[0], 6)


def test_a_bad_value_in_the_base_file_is_reported_at_the_base_line(chain):
    tmp_path, derived = chain
    (tmp_path / "base" / "base.toml").write_text(BASE.replace("sinkhorn_iterations = 7", "sinkhorn_iterations = 0"))
    with pytest.raises(SpecError) as e:
        load_spec(derived)
    (problem,) = e.value.problems
    assert problem.file.endswith("base.toml") and problem.line == 11 and problem.key == "model.mhc.sinkhorn_iterations"


@pytest.mark.parametrize("item,key,value", [
    ("model.mhc.streams=8", "model.mhc.streams", 8),
    ("train.lr=1e-3", "train.lr", 1e-3),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel", True),
    ('train.recompute=["mhc", "mlp"]', "train.recompute", ["mhc", "mlp"]),
    ('name="quoted name"', "name", "quoted name"),
    ("name=plain text", "name", "plain text"),
    ("data.tokenizer=/tmp/tok.json", "data.tokenizer", "/tmp/tok.json"),
    ("name=", "name", ""),
    (" model.num_layers = 3 ", "model.num_layers", 3),
])
def test_set_value_is_toml_else_a_plain_string(item, key, value):
    assert parse_override(item) == (key, value)


@pytest.mark.parametrize("item", ["noequals", "=3", "model..x=1", "model.x y=1"])
def test_malformed_set_items_are_rejected(item):
    with pytest.raises(ValueError):
        parse_override(item)


def test_set_overrides_after_extends_and_the_last_one_wins(chain):
    tmp_path, derived = chain
    spec = load_spec(derived, ["model.mhc.streams=8", "model.mhc.streams=16", "train.recompute=full"])
    assert spec.model.mhc.streams == 16
    assert spec.train.recompute == "full"
    assert locate(spec, "model.mhc.streams") == ("--set", None)


def test_set_paths_resolve_against_the_working_directory(chain, monkeypatch):
    tmp_path, derived = chain
    monkeypatch.chdir(tmp_path)
    spec = load_spec(derived, ["checkpoint.dir=elsewhere", 'data.paths=["x/y"]', "data.weights=[]"])
    assert spec.checkpoint.dir == str(tmp_path / "elsewhere")
    assert spec.data.paths == [str(tmp_path / "x" / "y")]


def test_set_unknown_key_suggests_the_close_one():
    with pytest.raises(SpecError) as e:
        load_spec(TINY, ["model.mhc.stream=2", "train.lrr=1"])
    text = str(e.value)
    assert "--set: model.mhc.stream: unknown key in [model.mhc]; did you mean 'streams'?" in text
    assert "--set: train.lrr: unknown key in [train]; did you mean 'lr'?" in text


def test_set_into_a_value_is_an_error():
    with pytest.raises(SpecError) as e:
        load_spec(TINY, ["model.num_layers.x=1"])
    assert "model.num_layers is a value, not a table" in str(e.value)


def test_set_cannot_change_extends():
    with pytest.raises(SpecError, match="extends cannot be overridden"):
        load_spec(TINY, ["extends=other.toml"])


def test_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my-run.toml"
    path.write_text(BASE.replace('name = "base"\n', "").replace("tok/tokenizer.json", "byte"))
    assert load_spec(path).name == "my-run"


def test_load_spec_checks_world_rules_only_when_given_a_world_size():
    assert load_spec(TINY, ["parallel.tp=2"]).parallel.tp == 2
    with pytest.raises(SpecError, match=r"world size 1 is not divisible by tp\*pp\*cp = 2\*1\*1 = 2"):
        load_spec(TINY, ["parallel.tp=2"], world_size=1)
    with pytest.raises(SpecError, match="does not divide model.num_attention_heads"):
        load_spec(TINY, ["parallel.tp=3"])


def test_resolved_toml_round_trips_to_the_same_spec(tmp_path):
    for name in ("tiny.toml", "dsv4-pro.toml", "legacy-average.toml"):
        spec = load_spec(REPO / "specs" / name)
        text = spec_to_toml(spec)
        tomllib.loads(text)
        copy = tmp_path / f"resolved-{name}"
        copy.write_text(text)
        again = load_spec(copy)
        assert again.model_dump() == spec.model_dump(), name


def test_legacy_average_extends_tiny_with_the_average_contraction():
    tiny, legacy = load_spec(TINY), load_spec(REPO / "specs" / "legacy-average.toml")
    assert legacy.model.contraction.mode == "average" and tiny.model.contraction.mode == "learned"
    assert legacy.model.model_dump(exclude={"contraction"}) == tiny.model.model_dump(exclude={"contraction"})


def test_tiny_spec_keeps_its_cpu_sized_dims():
    m = load_spec(TINY).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.mhc.streams, m.mtp.depth, m.vocab_size,
            m.seq_length, m.contraction.mode) == (2, 128, 4, 4, 1, 256, 128, "learned")


def test_key_lines_handles_tables_dotted_and_inline_keys_and_multiline_values():
    text = (
        'name = "x"  # c\n'            # 1
        "[model]\n"                     # 2
        "moe = {top_k = 2, e = 3}\n"    # 3
        's = """\n'                     # 4
        "[not_a_table]\n"               # 5
        '"""\n'                         # 6
        "arr = [\n"                     # 7
        '  "a]", 2,\n'                  # 8
        "]\n"                           # 9
        "mhc.streams = 4\n"             # 10
        "[ train ]\n"                   # 11
        "'lr' = 1.0\n"                  # 12
    )
    tomllib.loads(text)
    lines = key_lines(text)
    assert lines[("name",)] == 1
    assert lines[("model", "moe", "top_k")] == 3
    assert lines[("model", "s")] == 4
    assert ("not_a_table",) not in lines
    assert lines[("model", "arr")] == 7
    assert lines[("model", "mhc", "streams")] == 10
    assert lines[("train", "lr")] == 12


def test_inspect_spec_prints_resolved_toml_and_json(chain):
    tmp_path, derived = chain
    runner = CliRunner(env=ENV)
    result = runner.invoke(app, ["inspect", "spec", str(derived), "--set", "model.num_layers=6"])
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.stdout)
    assert data["model"]["num_layers"] == 6 and data["model"]["mhc"]["sinkhorn_iterations"] == 7
    assert "extends" not in data
    result = runner.invoke(app, ["inspect", "spec", str(derived), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["checkpoint"]["dir"] == str(tmp_path / "derived" / "out")


def test_inspect_spec_of_a_broken_spec_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnum_layers = [\n")
    result = CliRunner(env=ENV).invoke(app, ["inspect", "spec", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{bad}:" in result.stderr and "malformed TOML" in result.stderr


def test_schema_command_prints_the_json_schema():
    result = CliRunner(env=ENV).invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"model", "parallel", "train", "data", "checkpoint", "launch", "extends"} <= set(schema["properties"])


def test_version_flag():
    from dsv4cli import __version__

    result = CliRunner(env=ENV).invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout
