"""`dsv4 validate`: shipped specs pass; every kind of broken spec exits 2 naming FILE:LINE: key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4cli.cli import app

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "specs").glob("*.toml"))
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}

# A valid spec that sets (almost) every key explicitly, so a case can replace one line and
# know the line number the problem must point at.
BASE = """\
name = "t"
[model]
num_layers = 2
hidden_size = 64
num_attention_heads = 4
num_query_groups = 4
ffn_hidden_size = 128
vocab_size = 256
seq_length = 32
[model.mhc]
streams = 2
[model.contraction]
mode = "learned"
[model.mtp]
depth = 1
[parallel]
tp = 1
pp = 1
vpp = 1
cp = 1
ep = 1
sequence_parallel = false
[train]
steps = 10
micro_batch_size = 2
global_batch_size = 4
warmup_steps = 1
lr = 1e-3
min_lr = 1e-4
recompute = []
[data]
source = "builtin"
tokenizer = "byte"
paths = []
weights = []
[checkpoint]
dir = "runs/t"
[launch]
nproc_per_node = 1
nnodes = 1
node_rank = 0
"""
MOE = '[model.moe]\nnum_experts = 4\ntop_k = 2\nexpert_ffn_hidden_size = 32\nscore_function = "softmax"\n'
# MOE lines are 42..46 when appended to BASE.


def make_spec(tmp_path: Path, replace: dict[int, str] | None = None, extra: str = "", name: str = "spec.toml") -> Path:
    lines = BASE.splitlines()
    for number, text in (replace or {}).items():
        lines[number - 1] = text
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run(*args: str):
    return CliRunner(env=ENV).invoke(app, list(args))


def assert_clean_exit(result, code: int) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


# ---------------------------------------------------------------------------------------------
def test_base_spec_of_these_tests_is_valid(tmp_path):
    result = run("validate", str(make_spec(tmp_path)))
    assert_clean_exit(result, 0)
    result = run("validate", str(make_spec(tmp_path, extra=MOE)))
    assert_clean_exit(result, 0)


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_validates_for_its_intended_world_size(spec):
    result = run("validate", str(spec))
    assert_clean_exit(result, 0)
    assert "valid" in result.stdout and "torchrun" in result.stdout
    assert not [line for line in result.stderr.splitlines() if "warning" not in line], result.stderr


def test_the_shipped_specs_include_the_promised_variants():
    names = {p.name for p in SHIPPED}
    assert {"tiny.toml", "model.toml", "dsv4-flash.toml", "dsv4-pro.toml", "legacy-average.toml"} <= names


def test_validate_several_specs_at_once_in_json_prints_one_line_each():
    result = run("validate", *map(str, SHIPPED), "--json")
    assert_clean_exit(result, 0)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(SHIPPED)
    for line, path in zip(lines, SHIPPED):
        data = json.loads(line)
        assert data["spec"] == str(path) and data["valid"] is True and data["errors"] == []
        summary = data["summary"]
        assert summary["params"]["total"] > 0 and summary["flops_per_token"] > 0
        assert summary["memory_per_rank"]["total"] > 0
        assert summary["parallel"]["world"] >= 1
        assert summary["torchrun"][0] == "torchrun"


# ---------------------------------------------------------------------------------------------
# (replace lines, extra text, extra CLI args, key, line, message fragment)
BROKEN = {
    # malformed TOML
    "malformed_value": ({4: "hidden_size = = 64"}, "", [], "model.hidden_size", 4, "malformed TOML"),
    "malformed_string": ({33: 'tokenizer = "byte'}, "", [], "data.tokenizer", 33, "malformed TOML"),
    "duplicate_key": ({5: "hidden_size = 64"}, "", [], "model.hidden_size", 5, "malformed TOML"),
    "unclosed_header": ({16: "[parallel"}, "", [], "parallel", 16, "malformed TOML"),
    "unclosed_array": ({30: "recompute = [\"mhc\""}, "", [], "train.recompute", 30, "Unclosed array (opened on line 30"),
    # wrong types
    "string_for_int": ({3: 'num_layers = "two"'}, "", [], "model.num_layers", 3, "valid integer"),
    "fraction_for_int": ({17: "tp = 1.5"}, "", [], "parallel.tp", 17, "valid integer, got 1.5"),
    "int_for_bool": ({22: 'sequence_parallel = "maybe"'}, "", [], "parallel.sequence_parallel", 22, "valid boolean"),
    "table_for_value": ({33: "tokenizer = {kind = 1}"}, "", [], "data.tokenizer", 33, "valid string"),
    # strict types: TOML values are typed, so nothing is silently converted
    "quoted_int": ({3: 'num_layers = "2"'}, "", [], "model.num_layers", 3, "valid integer, got \"2\""),
    "float_for_int": ({4: "hidden_size = 64.0"}, "", [], "model.hidden_size", 4, "valid integer, got 64.0"),
    "bool_for_int": ({5: "num_attention_heads = true"}, "", [], "model.num_attention_heads", 5,
                     "valid integer, got true"),
    "string_for_bool": ({22: 'sequence_parallel = "yes"'}, "", [], "parallel.sequence_parallel", 22,
                        "valid boolean, got \"yes\""),
    "int_for_string": ({1: "name = 7"}, "", [], "name", 1, "valid string, got 7"),
    "value_for_table": ({10: "", 11: "mhc = 2"}, "", [], "model.mhc", 11, "must be a table"),
    "array_of_tables": ({23: "[[train]]"}, "", [], "train", 23, "must be a table"),
    "bad_literal": ({13: 'mode = "mean"'}, "", [], "model.contraction.mode", 13, "'learned' or 'average'"),
    "bad_source": ({32: 'source = "web"'}, "", [], "data.source", 32, "'builtin', 'mock' or 'indexed'"),
    "recompute_unknown_module": ({30: 'recompute = ["mhcc"]'}, "", [], "train.recompute", 30, "unknown module"),
    "recompute_bad_string": ({30: 'recompute = "some"'}, "", [], "train.recompute", 30, '"full"'),
    # out of range
    "inf_float": ({28: "lr = inf"}, "", [], "train.lr", 28, "must be a finite number, got inf"),
    "nan_float": ({28: "lr = nan"}, "", [], "train.lr", 28, "must be a finite number, got nan"),
    "nan_in_array": ({32: 'source = "mock"', 34: 'paths = ["a"]', 35: "weights = [nan]"}, "", [], "data.weights", 35,
                     "must hold finite numbers"),
    "streams_zero": ({11: "streams = 0"}, "", [], "model.mhc.streams", 11, "greater than or equal to 1, got 0"),
    "streams_too_many": ({11: "streams = 17"}, "", [], "model.mhc.streams", 11, "less than or equal to 16"),
    "negative_mtp": ({15: "depth = -1"}, "", [], "model.mtp.depth", 15, "greater than or equal to 0"),
    "zero_layers": ({3: "num_layers = 0"}, "", [], "model.num_layers", 3, "greater than or equal to 1"),
    # unknown keys at every depth, with did-you-mean
    "unknown_top": ({1: 'nmae = "t"'}, "", [], "nmae", 1, "did you mean 'name'"),
    "unknown_section": ({23: "[trian]"}, "", [], "trian", 23, "did you mean 'train'"),
    "unknown_model_key": ({4: "hiden_size = 64"}, "", [], "model.hiden_size", 4, "did you mean 'hidden_size'"),
    "unknown_mhc_key": ({11: "streems = 2"}, "", [], "model.mhc.streems", 11, "did you mean 'streams'"),
    "unknown_moe_key": ({}, MOE + "topk = 2\n", [], "model.moe.topk", 47, "did you mean 'top_k'"),
    "unknown_parallel_key": ({18: "ppp = 1"}, "", [], "parallel.ppp", 18, "did you mean 'pp'"),
    "unknown_key_no_match": ({18: "zzzzz = 1"}, "", [], "parallel.zzzzz", 18, "valid keys: tp, pp"),
    "dotted_unknown_key": ({41: "launch2.x = 0"}, "", [], "launch.launch2", 41, "unknown key"),
    # missing required key: points at its table
    "missing_required": ({7: ""}, "", [], "model.ffn_hidden_size", 2, "required key is missing"),
    "missing_moe_required": ({}, "[model.moe]\nnum_experts = 4\ntop_k = 2\n", [], "model.moe.expert_ffn_hidden_size",
                             42, "required"),
    # extends
    "missing_extends_file": ({1: 'extends = "nope.toml"'}, "", [], "extends", 1, "file not found"),
    "extends_not_a_string": ({1: "extends = 3"}, "", [], "extends", 1, "must be a file path"),
    # cross-field rules, with the numbers
    "heads_vs_tp": ({17: "tp = 3"}, "", ["--world-size", "3"], "parallel.tp", 17,
                    "parallel.tp (3) does not divide model.num_attention_heads (4)"),
    "groups_vs_tp": ({4: "hidden_size = 96", 5: "num_attention_heads = 12", 7: "ffn_hidden_size = 129", 17: "tp = 3"},
                     "", ["--world-size", "3"], "parallel.tp", 17,
                     "query groups (4) must be a multiple or a divisor of parallel.tp (3)"),
    "heads_vs_groups": ({6: "num_query_groups = 3"}, "", [], "model.num_query_groups", 6,
                        "model.num_attention_heads (4) is not divisible by model.num_query_groups (3)"),
    "hidden_vs_heads": ({4: "hidden_size = 66"}, "", [], "model.hidden_size", 4,
                        "model.hidden_size (66) is not divisible by model.num_attention_heads (4)"),
    "ffn_vs_tp": ({7: "ffn_hidden_size = 129", 17: "tp = 2"}, "", ["--world-size", "2"], "parallel.tp", 17,
                  "parallel.tp (2) does not divide model.ffn_hidden_size (129)"),
    "layers_vs_pp": ({18: "pp = 3"}, "", ["--world-size", "3"], "model.num_layers", 3,
                     "model.num_layers (2) is not divisible by parallel.pp*parallel.vpp (3*1 = 3)"),
    "vpp_without_pp": ({19: "vpp = 2"}, "", [], "parallel.vpp", 19, "parallel.vpp (2) needs parallel.pp > 1"),
    "layout_stages": ({22: 'pp_layout = "Et|tmL"'}, "", [], "parallel.pp_layout", 22,
                      "has 2 stages but parallel.pp*parallel.vpp = 1*1 = 1"),
    "layout_layers": ({18: "pp = 2", 22: 'pp_layout = "Et|mL"'}, "", ["--world-size", "2"], "parallel.pp_layout", 22,
                      "has 1 decoder layers (t) but model.num_layers = 2"),
    "layout_mtp": ({18: "pp = 2", 22: 'pp_layout = "Et|tL"'}, "", ["--world-size", "2"], "parallel.pp_layout", 22,
                   "has 0 MTP layers (m) but model.mtp.depth = 1"),
    "layout_bad_char": ({18: "pp = 2", 22: 'pp_layout = "Et|txL"'}, "", ["--world-size", "2"], "parallel.pp_layout", 22,
                        "invalid layout character 'x'"),
    "layout_mtp_before_layers": ({18: "pp = 2", 22: 'pp_layout = "Etm|tL"'}, "", ["--world-size", "2"],
                                 "parallel.pp_layout", 22, "decoder layers (t) must come before MTP layers (m)"),
    "experts_vs_ep": ({21: "ep = 3"}, MOE, ["--world-size", "3"], "parallel.ep", 21,
                      "parallel.ep (3) does not divide model.moe.num_experts (4)"),
    "top_k_vs_experts": ({}, MOE.replace("top_k = 2", "top_k = 5"), [], "model.moe.top_k", 44,
                         "model.moe.top_k (5) exceeds model.moe.num_experts (4)"),
    "ep_without_moe": ({21: "ep = 2"}, "", ["--world-size", "2"], "parallel.ep", 21, "needs a [model.moe] section"),
    "hash_layers_vs_layers": ({}, MOE + "hash_layers = 3\n", [], "model.moe.hash_layers", 47,
                              "model.moe.hash_layers (3) exceeds model.num_layers (2)"),
    "seq_vs_cp": ({9: "seq_length = 30", 20: "cp = 2"}, "", ["--world-size", "2"], "model.seq_length", 9,
                  "model.seq_length (30) is not divisible by 2*parallel.cp (4)"),
    "sp_needs_tp": ({22: "sequence_parallel = true"}, "", [], "parallel.sequence_parallel", 22,
                    "sequence_parallel needs parallel.tp > 1"),
    "moe_tp_needs_sp": ({17: "tp = 2"}, MOE, ["--world-size", "2"], "parallel.sequence_parallel", 22,
                        "needs parallel.sequence_parallel = true"),
    # megatron-core 0.16 reduces the experts' grads as dense ones when ep = 1: right only with etp = tp
    "moe_ep1_etp_below_tp": ({17: "tp = 2", 19: "etp = 1", 22: "sequence_parallel = true"}, MOE,
                             ["--world-size", "2"], "parallel.etp", 19,
                             "MoE with parallel.ep = 1 needs parallel.etp = parallel.tp (tp = 2, etp = 1)"),
    "moe_ep1_etp_above_tp": ({19: "etp = 2"}, MOE, ["--world-size", "2"], "parallel.etp", 19,
                             "MoE with parallel.ep = 1 needs parallel.etp = parallel.tp (tp = 1, etp = 2)"),
    "world_vs_tp": ({17: "tp = 2"}, "", ["--world-size", "3"], "parallel.tp", 17,
                    "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    "world_from_launch": ({17: "tp = 2", 39: "nproc_per_node = 3"}, "", [], "parallel.tp", 17,
                          "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    "expert_grid_vs_world": ({21: "ep = 4"}, MOE, ["--world-size", "2"], "parallel.ep", 21,
                             "world size 2 is not divisible by the expert grid etp*ep*pp = 1*4*1 = 4"),
    "global_batch_vs_micro": ({26: "global_batch_size = 5"}, "", [], "train.global_batch_size", 26,
                              "train.global_batch_size (5) is not divisible by micro_batch_size*dp = 2*1 = 2"),
    "global_batch_vs_dp": ({}, "", ["--world-size", "4"], "train.global_batch_size", 26,
                           "micro_batch_size*dp = 2*4 = 8"),
    "min_lr_above_lr": ({29: "min_lr = 1.0"}, "", [], "train.min_lr", 29, "train.min_lr (1.0) exceeds train.lr (0.001)"),
    "indexed_without_paths": ({32: 'source = "indexed"'}, "", [], "data.paths", 34, "needs data.paths"),
    "weights_vs_paths": ({32: 'source = "mock"', 34: 'paths = ["a", "b"]', 35: "weights = [1.0]"}, "", [],
                         "data.weights", 35, "data.weights has 1 entries but data.paths has 2"),
    "indexed_files_missing": ({32: 'source = "indexed"', 34: 'paths = ["data/corpus"]'}, "", [], "data.paths", 34,
                              "corpus.bin"),
    "tokenizer_file_missing": ({33: 'tokenizer = "tok/tokenizer.json"'}, "", [], "data.tokenizer", 33,
                               "tokenizer file not found"),
    "byte_vocab_too_small": ({8: "vocab_size = 100"}, "", [], "model.vocab_size", 8,
                             "model.vocab_size (100) is smaller than the byte tokenizer's 256 tokens"),
    "node_rank_vs_nnodes": ({41: "node_rank = 1"}, "", [], "launch.node_rank", 41,
                            "launch.node_rank (1) must be < launch.nnodes (1)"),
    "checkpoint_load_missing": ({37: 'load = "runs/none"'}, "", [], "checkpoint.load", 37, "not found"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_broken_spec_exits_2_naming_file_line_and_key(tmp_path, case):
    replace, extra, args, key, line, fragment = BROKEN[case]
    path = make_spec(tmp_path, replace, extra)
    result = run("validate", str(path), *args)
    assert_clean_exit(result, 2)
    expected = f"{path}:{line}: {key}: "
    matching = [l for l in result.stderr.splitlines() if l.startswith(expected)]
    assert matching, f"no line starting with {expected!r} in:\n{result.stderr}"
    assert any(fragment in l for l in matching), f"{fragment!r} not in {matching}"


def test_moe_under_tp_alone_gets_the_expert_layout_it_needs(tmp_path):
    """Unset etp / sequence_parallel resolve to what MoE under tp needs: `--set parallel.tp=2` suffices."""
    spec = make_spec(tmp_path, {22: ""}, MOE)
    result = run("validate", str(spec), "--world-size", "2", "--set", "parallel.tp=2", "--resolved")
    assert_clean_exit(result, 0)
    lines = {line.split("=")[0].strip(): line.split("=")[1].split("#")[0].strip()
             for line in result.stdout.splitlines() if line.strip().startswith("parallel.")}
    assert lines["parallel.etp"] == "2" and lines["parallel.sequence_parallel"] == "true"
    dense = run("validate", str(make_spec(tmp_path, {22: ""}, name="dense.toml")), "--world-size", "2",
                "--set", "parallel.tp=2", "--resolved")
    assert_clean_exit(dense, 0)
    assert "parallel.etp = 1 " in dense.stdout and "parallel.sequence_parallel = false " in dense.stdout


def test_all_problems_are_reported_at_once(tmp_path):
    path = make_spec(tmp_path, {11: "streems = 2", 13: 'mode = "mean"', 17: "tp = 3"})
    result = run("validate", str(path))
    assert_clean_exit(result, 2)
    stderr = result.stderr
    assert f"{path}:11: model.mhc.streems: " in stderr
    assert f"{path}:13: model.contraction.mode: " in stderr
    # cross-field rules still run on the values the schema accepted
    assert f"{path}:17: parallel.tp: parallel.tp (3) does not divide model.num_attention_heads (4)" in stderr


def test_extends_cycle_is_an_error_at_the_extends_line(tmp_path):
    (tmp_path / "a.toml").write_text('# a\nextends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    result = run("validate", str(tmp_path / "a.toml"))
    assert_clean_exit(result, 2)
    assert "b.toml:1: extends: cycle: " in result.stderr
    assert "a.toml -> " in result.stderr


def test_missing_spec_file_exits_2(tmp_path):
    result = run("validate", str(tmp_path / "absent.toml"))
    assert_clean_exit(result, 2)
    assert "file not found" in result.stderr


def test_problem_from_set_is_attributed_to_set(tmp_path):
    result = run("validate", str(make_spec(tmp_path)), "--set", "model.mhc.streems=3", "--set", "parallel.tp=3")
    assert_clean_exit(result, 2)
    assert "--set: model.mhc.streems: unknown key in [model.mhc]; did you mean 'streams'?" in result.stderr
    assert "--set: parallel.tp: parallel.tp (3) does not divide model.num_attention_heads (4)" in result.stderr


def test_malformed_set_item_exits_2(tmp_path):
    result = run("validate", str(make_spec(tmp_path)), "--set", "no_equals_sign")
    assert_clean_exit(result, 2)
    assert "--set: expected KEY=VALUE" in result.stderr


def test_warnings_are_printed_but_exit_0(tmp_path):
    path = make_spec(tmp_path, {11: "streams = 1", 13: 'mode = "average"'})
    result = run("validate", str(path))
    assert_clean_exit(result, 0)
    assert f"{path}:13: model.contraction.mode: warning: contraction mode 'average'" in result.stderr


@pytest.mark.parametrize("extra,key", [
    (MOE.replace('"softmax"', '"sqrtsoftplus"') + "aux_loss_coeff = 0.01\n", "model.moe.aux_loss_coeff"),
    (MOE + "hash_layers = 1\n", "model.moe.hash_layers"),  # hash routing weighs by sqrt(softplus) only
])
def test_unsupported_features_warn_in_validate_and_are_errors_for_train(tmp_path, extra, key):
    from dsv4cli.spec.check import check_spec

    path = make_spec(tmp_path, extra=extra)
    result = run("validate", str(path))
    assert_clean_exit(result, 0)
    assert f": {key}: warning: " in result.stderr and "not supported" in result.stderr
    strict = check_spec(str(path), unsupported_are_errors=True)
    assert not strict.valid and [p.key for p in strict.errors] == [key]


def test_context_parallel_is_flagged_unsupported(tmp_path):
    result = run("validate", str(make_spec(tmp_path, {20: "cp = 2"})), "--world-size", "2")
    assert_clean_exit(result, 0)
    assert ":20: parallel.cp: warning: context parallelism" in result.stderr


def test_json_output_on_errors_has_file_line_key_message(tmp_path):
    good = make_spec(tmp_path, name="good.toml")
    bad = make_spec(tmp_path, {11: "streams = 0"}, name="bad.toml")
    result = run("validate", str(good), str(bad), "--json")
    assert_clean_exit(result, 2)
    first, second = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert first["valid"] is True and first["summary"] is not None
    assert second["valid"] is False and second["summary"] is None
    assert second["errors"][0] == {
        "file": str(bad), "line": 11, "key": "model.mhc.streams",
        "message": "input should be greater than or equal to 1, got 0",
    }
    assert set(second) >= {"valid", "errors", "warnings", "summary"}


def test_world_size_flag_overrides_launch(tmp_path):
    path = make_spec(tmp_path)
    result = run("validate", str(path), "--world-size", "2", "--json")
    assert_clean_exit(result, 0)
    sizes = json.loads(result.stdout)["summary"]["parallel"]
    assert sizes["world"] == 2 and sizes["dp"] == 2 and sizes["num_microbatches"] == 1


def test_human_summary_shows_estimates_and_torchrun(tmp_path):
    result = run("validate", str(REPO / "specs" / "tiny.toml"))
    assert_clean_exit(result, 0)
    out = result.stdout
    for fragment in ("Parameters", "mHC", "contraction", "MTP", "FLOPs per token",
                     "Memory per rank", "n-stream residual", "Parallel sizes",
                     "torchrun --nnodes 1 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d"):
        assert fragment in out, fragment


def test_small_vocab_is_fine_with_mock_data(tmp_path):
    result = run("validate", str(make_spec(tmp_path, {8: "vocab_size = 100", 32: 'source = "mock"'})))
    assert_clean_exit(result, 0)


def test_standalone_mtp_stage_with_mhc_is_flagged_unsupported(tmp_path):
    path = make_spec(tmp_path, {18: "pp = 3", 3: "num_layers = 2", 22: 'pp_layout = "Et|tm|L"'})
    result = run("validate", str(path), "--world-size", "3", "--set", "train.global_batch_size=6")
    assert_clean_exit(result, 0)
    assert f"{path}:22: parallel.pp_layout: warning: MTP layers outside the last pipeline stage" in result.stderr


@pytest.mark.parametrize("command", [["validate"], ["inspect", "spec"], ["schema"]], ids=" ".join)
def test_help_says_what_the_command_does_with_an_example(command):
    result = run(*command, "--help")
    assert_clean_exit(result, 0)
    text = result.stdout
    assert "Examples:" in text
    example = [l.strip() for l in text.splitlines() if l.strip().startswith("dsv4 " + " ".join(command))]
    assert example, text


def test_set_value_of_the_wrong_type_is_an_error_not_a_conversion(tmp_path):
    path = make_spec(tmp_path)
    result = run("validate", str(path), "--set", 'model.num_layers="4"', "--set", "model.mhc=3",
                 "--set", "train.lr=1")  # an integer where a float belongs is fine
    assert_clean_exit(result, 2)
    lines = result.stderr.splitlines()
    assert '--set: model.num_layers: input should be a valid integer, got "4"' in lines
    assert any(l.startswith("--set: model.mhc: must be a table") for l in lines)
    assert not any("train.lr" in l for l in lines)


def test_dense_and_expert_grid_problems_are_both_reported(tmp_path):
    path = make_spec(tmp_path, {17: "tp = 4", 21: "ep = 3"}, extra=MOE.replace("num_experts = 4", "num_experts = 6"))
    result = run("validate", str(path), "--world-size", "2", "--set", "parallel.sequence_parallel=true")
    assert_clean_exit(result, 2)
    assert "world size 2 is not divisible by tp*pp*cp = 4*1*1 = 4" in result.stderr
    assert "world size 2 is not divisible by the expert grid etp*ep*pp = 1*3*1 = 3" in result.stderr
