"""ParallelDims (dsv4cli/spec/layout.py): the one parallel-dimensions type, its checks and records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dsv4cli.spec.layout import ParallelDims, single_process_spec
from dsv4cli.spec.load import load_spec

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.toml"
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=64"]


def test_sizes_follow_the_dense_and_expert_grids():
    spec = load_spec(TINY, ["parallel.tp=2", "parallel.pp=2", "train.global_batch_size=8",
                            "train.micro_batch_size=1", *MOE, "parallel.ep=4", "parallel.sequence_parallel=true"])
    dims = ParallelDims.of(spec, 16).check()
    assert (dims.world, dims.dp, dims.edp, dims.num_microbatches) == (16, 4, 2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.dp = 3


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.tp=2"], "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    (2, [*MOE, "parallel.ep=4"], "world size 2 is not divisible by the expert grid etp*ep*pp = 1*4*1 = 4"),
])
def test_check_names_the_sizes_that_do_not_divide_the_world(world, overrides, message):
    dims = ParallelDims.of(load_spec(TINY, overrides), world)
    with pytest.raises(ValueError) as err:
        dims.check()
    assert message in str(err.value)
    assert [m for _, m in dims.grid_problems()] == [str(err.value)]


def test_batch_problems_only_once_the_grids_divide():
    spec = load_spec(TINY, ["train.global_batch_size=5", "train.micro_batch_size=1", "parallel.tp=2"])
    assert ParallelDims.of(spec, 3).batch_problems() == []  # the grid problem comes first
    (keys, message), = ParallelDims.of(spec, 4).batch_problems()
    assert keys[0] == "train.global_batch_size"
    assert message == "train.global_batch_size (5) is not divisible by micro_batch_size*dp = 1*2 = 2"
    ParallelDims.of(spec, 4).check()  # the process groups can still be built: check() is about grids


def test_checkpoint_layout_is_the_dict_checkpoints_record():
    dims = ParallelDims.of(load_spec(TINY, ["parallel.tp=2"]), 4)
    record = dims.checkpoint_layout()
    assert list(record) == ["world", "tp", "pp", "vpp", "cp", "ep", "etp", "dp"]
    assert record == dict(world=4, tp=2, pp=1, vpp=1, cp=1, ep=1, etp=1, dp=2)
    assert set(dims.to_json()) > set(record)


def test_single_process_spec_flattens_every_parallel_size():
    spec = load_spec(TINY, ["parallel.pp=2", "parallel.vpp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                            "parallel.pp_layout=Et|t|m|L"])
    flat = single_process_spec(spec)
    p = flat.parallel
    assert (p.tp, p.pp, p.vpp, p.cp, p.ep, p.etp, p.sequence_parallel, p.pp_layout) == (1, 1, 1, 1, 1, 1, False, None)
    assert flat.model.vocab_pad_multiple == 2 * spec.model.vocab_pad_multiple
    assert ParallelDims.of(flat, 1).check().dp == 1
    assert (spec.parallel.tp, spec.parallel.pp_layout) == (2, "Et|t|m|L")  # the input is untouched
