"""How the model is put together (dsv4cli/model/gpt.py, config.py): one config object carries the
DSv4 settings to every module, the multi-stream block is built explicitly, and forward leaves the
modules as they were (no attribute swapped while it runs)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_1proc")

S, B = 16, 2


def _build(spec):
    from dsv4cli.build import build_model

    torch.manual_seed(3)
    return build_model(spec)


def test_one_config_carries_the_dsv4_settings_to_every_module(tiny_spec):
    from dsv4cli.build import transformer_config
    from dsv4cli.model.hyper_connection import HyperConnection

    spec = tiny_spec(**{"model.mhc.streams": 3, "model.mhc.sinkhorn_iterations": 7,
                        "model.contraction.mode": "average", "model.mtp.depth": 2, "train.recompute": ["mhc"]})
    config = transformer_config(spec)
    assert (config.mhc_streams, config.mhc_sinkhorn_iterations, config.contraction_mode, config.mhc_recompute) == (
        3, 7, "average", True)
    model = _build(spec)
    layer_config = model.decoder.config
    assert layer_config.mhc_streams == 3 and layer_config.hidden_size == 32
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    assert len(hcs) == 2 * (2 + 2)  # two per decoder layer and per MTP depth's layer
    assert all(hc.config is layer_config for hc in hcs)
    assert all(layer.config is layer_config for layer in model.mtp.layers)
    assert not any("hc_head" in n for n, _ in model.named_parameters())  # average: no contraction parameters
    # pipeline p2p buffers: the model's own config is the only one with hidden_size n*h
    assert model.config.hidden_size == 3 * 32 and model.config is not layer_config


def test_multi_stream_block_is_built_explicitly_and_forward_changes_no_module(tiny_spec):
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer.transformer_block import TransformerBlock

    from dsv4cli.model.multi_stream_block import MultiStreamTransformerBlock

    model = _build(tiny_spec(**{"model.mhc.streams": 2, "model.mtp.depth": 0}))
    assert gpt_model.TransformerBlock is TransformerBlock  # megatron's namespace is left alone
    assert type(model.decoder) is MultiStreamTransformerBlock
    names = [n for n, _ in model.named_parameters()]
    assert names[0].startswith("embedding.") and names[-1] == "output_layer.weight"
    assert "decoder.final_layernorm.weight" in names and not any("mtp" in n for n in names)
    # the norm stays the registered child `final_layernorm`; megatron's forward reads None there
    assert model.decoder.final_layernorm is None
    assert dict(model.decoder.named_children())["final_layernorm"] is model.decoder.head_norm
    before = {m: dict(vars(m)) for m in model.modules()}
    registered_during_forward = []
    decoder = model.decoder
    decoder.layers[-1].register_forward_hook(
        lambda *_: registered_during_forward.append(decoder._modules["final_layernorm"] is decoder.head_norm))
    ids = torch.randint(0, 256, (B, S))
    logits = model(ids, torch.arange(S).expand(B, S), None)
    assert logits.shape == (B, S, 256) and registered_during_forward == [True]
    for module, attrs in before.items():
        after = vars(module)
        changed = [k for k in attrs.keys() | after.keys() if k != "training" and attrs.get(k) is not after.get(k)]
        assert not changed, (type(module).__name__, changed)


def test_multi_stream_mtp_layer_has_no_megatron_eh_proj(tiny_spec):
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    model = _build(tiny_spec(**{"model.mhc.streams": 2, "model.mtp.depth": 1}))
    layer = model.mtp.layers[0]
    assert not isinstance(layer, MultiTokenPredictionLayer)
    names = {n for n, _ in layer.named_parameters()}
    assert {"e_proj.weight", "h_proj.weight", "hc_head_fn"} <= names and not any("eh_proj" in n for n in names)
