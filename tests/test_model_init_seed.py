"""Layout-independent initialisation (dsv4cli/model/init_seed.py): every unit draws from (seed, unit).

The PP=2 / VPP=2 / TP=2 fresh-init comparisons against one process run under torchrun in
tests/test_model_distributed.py (slow, `fresh_*` cases)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_1proc")


def _params(spec, seed):
    from dsv4cli.build import build_model

    torch.manual_seed(seed)
    return {n: p.detach().clone() for n, p in build_model(spec).named_parameters()}


def test_same_seed_same_model_and_the_callers_stream_is_untouched(tiny_spec):
    spec = tiny_spec()
    a = _params(spec, 7)
    after_build = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_build, torch.rand(4))  # building consumed nothing from the caller's stream
    b = _params(spec, 7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _params(spec, 8)
    assert not torch.equal(a["decoder.layers.0.self_attention.linear_qkv.weight"],
                           c["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_a_layer_does_not_depend_on_what_was_built_before_it(tiny_spec):
    """Layer 2 of a 2-layer model == layer 2 of a 3-layer model; the output layer and MTP likewise
    do not depend on the number of layers before them (what PP needs: stages build different prefixes)."""
    two = _params(tiny_spec(), 11)
    three = _params(tiny_spec(**{"model.num_layers": 3}), 11)
    scaled = ("linear_proj.weight", "linear_fc2.weight")  # megatron scales their init std by 1/sqrt(2*layers)
    checked = [n for n in two if (n.startswith("decoder.layers.1.") and not n.endswith(scaled))
               or n.startswith("embedding.") or n == "output_layer.weight"]
    assert "output_layer.weight" in checked and any("hyper_connection" in n for n in checked)
    for name in checked:
        assert torch.equal(two[name], three[name]), name
    mtp = [n for n in two if n.startswith("mtp.") and "transformer_layer" in n and n.endswith("linear_qkv.weight")]
    assert mtp
    # MTP depth k is its own unit: independent of the decoder depth as well
    assert all(torch.equal(two[n], three[n]) for n in mtp)
    assert not torch.equal(two["decoder.layers.0.self_attention.linear_qkv.weight"],
                           two["decoder.layers.1.self_attention.linear_qkv.weight"])


def test_unit_seeds_are_distinct():
    from dsv4cli.model.init_seed import EMBEDDING_UNIT, MTP_UNIT, OUTPUT_UNIT, unit_seed

    units = [EMBEDDING_UNIT, *range(1, 200), MTP_UNIT + 1, MTP_UNIT + 2, OUTPUT_UNIT]
    assert len({unit_seed(1234, u) for u in units}) == len(units)
