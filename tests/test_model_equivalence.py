"""The model against independent references: megatron's GPTModel (streams=1), HF DeepSeek-V4 mHC
modules (one mHC layer, the contraction), and the average <-> learned contraction identity."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_1proc")

S, B = 16, 2


def _batch(vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    return ids, torch.arange(S).expand(B, S).contiguous()


def _build(spec, seed: int = 1234):
    from megatron.core import tensor_parallel

    from dsv4cli.build import build_model

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return build_model(spec)


def test_streams1_logits_equal_megatron_gptmodel(tiny_spec):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from dsv4cli.build import padded_vocab_size, transformer_config

    spec = tiny_spec(**{"model.mhc.streams": 1, "model.mtp.depth": 0})
    ours = _build(spec).eval()
    assert not any("hyper_connection" in n or "hc_head" in n for n, _ in ours.named_parameters())
    reference = GPTModel(
        transformer_config(spec), get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab_size(spec), max_sequence_length=S, position_embedding_type="rope",
        rotary_base=int(spec.model.rotary_base),
    ).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    ids, pos = _batch()
    with torch.no_grad():
        a, b = ours(ids, pos, None), reference(ids, pos, None)
    assert a.shape == (B, S, 256)
    diff = (a - b).abs().max().item()
    assert diff <= 1e-6, f"logits differ from megatron GPTModel by {diff}"


def _hf_config(n: int, h: int, eps: float):
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    return DeepseekV4Config(hidden_size=h, hc_mult=n, hc_sinkhorn_iters=20, hc_eps=eps, rms_norm_eps=eps)


def _hf_hyper_connection(ours, cfg):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    hc = DeepseekV4HyperConnection(cfg)
    with torch.no_grad():
        hc.fn.copy_(ours.mapping_proj.weight)
        hc.base.copy_(ours.bias)
        hc.scale.copy_(torch.cat([ours.alpha_pre, ours.alpha_post, ours.alpha_res]))
    return hc


def test_mhc_layer_and_contraction_equal_hf_deepseek_v4(tiny_spec):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead

    n, h = 4, 32
    spec = tiny_spec(**{"model.mhc.streams": n, "model.mtp.depth": 0})
    model = _build(spec).eval()
    layer = model.decoder.layers[0]
    with torch.no_grad():  # non-trivial mappings: gating scales and biases away from their init
        for hc in (layer.self_attention_hyper_connection, layer.mlp_hyper_connection):
            hc.alpha_pre.fill_(0.7), hc.alpha_post.fill_(-0.4), hc.alpha_res.fill_(1.3)
            hc.bias.normal_()
        model.decoder.hc_head_base.normal_()
        model.decoder.hc_head_scale.fill_(0.8)
    cfg = _hf_config(n, h, spec.model.mhc.eps)
    x = torch.randn(S, B, n * h)
    rope = model.rotary_pos_emb(S)
    with torch.no_grad():
        ours, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
        # HF's layer update with our attention/MLP as the sub-layers
        attn_hc = _hf_hyper_connection(layer.self_attention_hyper_connection, cfg)
        mlp_hc = _hf_hyper_connection(layer.mlp_hyper_connection, cfg)
        streams = x.view(S, B, n, h)
        post, comb, collapsed = attn_hc(streams)
        f, _ = layer.self_attention(layer.input_layernorm(collapsed), attention_mask=None, rotary_pos_emb=rope)
        streams = post.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
        post, comb, collapsed = mlp_hc(streams)
        f, _ = layer.mlp(layer.pre_mlp_layernorm(collapsed))
        streams = post.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
        layer_diff = (ours - streams.reshape(S, B, n * h)).abs().max().item()

        head = DeepseekV4HyperHead(cfg)
        head.hc_fn.copy_(model.decoder.hc_head_fn)
        head.hc_base.copy_(model.decoder.hc_head_base)
        head.hc_scale.copy_(model.decoder.hc_head_scale)
        from dsv4cli.model.contraction import contract

        contraction_diff = (contract(model.decoder, ours) - head(ours.view(S, B, n, h))).abs().max().item()
    assert layer_diff <= 1e-5, f"mHC layer differs from HF DeepseekV4HyperConnection update by {layer_diff}"
    assert contraction_diff <= 1e-5, f"contraction differs from HF DeepseekV4HyperHead by {contraction_diff}"


@pytest.mark.parametrize("n", [2, 4])
def test_average_contraction_is_stream_mean_and_converted_learned_equals_it(n):
    from dsv4cli.ckpt.convert import contraction_base
    from dsv4cli.model.config import Dsv4TransformerConfig
    from dsv4cli.model.contraction import add_contraction_params, contract

    h, eps = 32, 1e-6
    x = torch.randn(S, B, n * h)
    avg, learned = torch.nn.Module(), torch.nn.Module()
    for owner, mode in ((avg, "average"), (learned, "learned")):
        owner.config = Dsv4TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=1, mhc_streams=n,
                                             contraction_mode=mode, contraction_eps=eps)
        add_contraction_params(owner, owner.config)
    with torch.no_grad():
        learned.hc_head_fn.zero_()
        learned.hc_head_scale.fill_(1.0)
        learned.hc_head_base.fill_(contraction_base(n, eps))
        mean = x.view(S, B, n, h).mean(2)
        y_avg, y_learned = contract(avg, x), contract(learned, x)
    assert torch.allclose(y_avg, mean, rtol=0, atol=1e-7), (y_avg - mean).abs().max()
    rel = ((y_learned - y_avg).abs().max() / y_avg.abs().max()).item()
    assert rel <= 1e-6, f"converted learned contraction deviates from average by {rel} (relative)"


def test_converted_learned_model_reproduces_average_model_loss(tiny_spec):
    from dsv4cli.ckpt.convert import contraction_base

    n = 2
    avg = _build(tiny_spec(**{"model.mhc.streams": n, "model.mtp.depth": 2, "model.contraction.mode": "average"}))
    learned = _build(tiny_spec(**{"model.mhc.streams": n, "model.mtp.depth": 2}), seed=7)
    missing, unexpected = learned.load_state_dict(avg.state_dict(), strict=False)
    assert sorted(missing) == sorted(
        [f"{p}hc_head_{s}" for p in ["decoder."] + [f"mtp.layers.{k}." for k in range(2)] for s in ("fn", "base", "scale")]
    ) and not unexpected
    base = contraction_base(n, 1e-6)
    with torch.no_grad():
        for owner in [learned.decoder, *learned.mtp.layers]:
            owner.hc_head_fn.zero_(), owner.hc_head_scale.fill_(1.0), owner.hc_head_base.fill_(base)
    ids, pos = _batch()
    avg.eval(), learned.eval()
    with torch.no_grad():
        a, b = avg(ids, pos, None, labels=ids), learned(ids, pos, None, labels=ids)
    assert (a - b).abs().max().item() <= 1e-5


def _learned_contraction(x, fn, base, scale, n: int, eps: float):
    """docs/design.md §2.3 written out: [s, b, n*h] -> [s, b, h]."""
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid((x @ fn.t()) * r * scale + base) + eps
    return (pre.unsqueeze(-1) * x.unflatten(-1, (n, -1))).sum(-2)


def _shift_left(t, k: int):
    """[b, s] -> t[:, k:] padded with k zeros (megatron's roll_tensor applied k times)."""
    return torch.cat([t[:, k:], torch.zeros_like(t[:, :k])], dim=1)


def _mtp_reference(model, ids, pos, labels, loss_mask, n: int, h: int, eps: float = 1e-6):
    """docs/design.md §2.4 by hand -> (main per-token CE [b, s], [masked mean CE of depth k for k = 1..D]).

    Depth k embeds the tokens shifted by k; e_proj(enorm(e)) is added to h_proj(hnorm(x_i)) of every
    stream of depth k-1 (the decoder's un-contracted streams for k = 1); its own mHC layer runs; its
    contraction + final norm feeds the shared output layer, scored against labels shifted by k."""
    import torch.nn.functional as F

    rope = model.rotary_pos_emb(S)

    def embed(tokens):
        return model.embedding(input_ids=tokens, position_ids=pos)

    def ce(hidden, target):  # hidden [s, b, h] -> per-token CE [b, s]
        logits, _ = model.output_layer(hidden)
        return F.cross_entropy(logits.transpose(0, 1).flatten(0, 1), target.flatten(), reduction="none").view(B, S)

    def head(owner, x):  # the child registered as final_layernorm (the decoder's attribute reads None)
        norm = dict(owner.named_children())["final_layernorm"]
        return norm(_learned_contraction(x, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, n, eps))

    x = embed(ids).repeat(1, 1, n)  # n identical streams
    for layer in model.decoder.layers:
        x, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
    main = ce(head(model.decoder, x), labels)
    depth_losses = []
    for k, mtp in enumerate(model.mtp.layers, start=1):
        e, _ = mtp.e_proj(mtp.enorm(embed(_shift_left(ids, k))))
        streams = [mtp.h_proj(mtp.hnorm(x[..., i * h:(i + 1) * h]))[0] + e for i in range(n)]
        x, _ = mtp.transformer_layer(torch.cat(streams, dim=-1), attention_mask=None, rotary_pos_emb=rope)
        mask = _shift_left(loss_mask, k)
        depth_losses.append((ce(head(mtp, x), _shift_left(labels, k)) * mask).sum() / mask.sum())
    return main, depth_losses


def _mtp_model_and_batch(tiny_spec, loss_scale: float = 0.1):
    n, depth = 2, 2
    model = _build(tiny_spec(**{"model.mhc.streams": n, "model.mtp.depth": depth, "model.mtp.loss_scale": loss_scale}))
    with torch.no_grad():  # contraction parameters away from their init, different per owner
        for owner in [model.decoder, *model.mtp.layers]:
            owner.hc_head_base.normal_(), owner.hc_head_scale.uniform_(0.5, 1.5)
    model.train()  # megatron tracks MTP losses in training mode only (dropout is 0)
    ids, pos = _batch()
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones(B, S)
    loss_mask[0, 3] = 0.0
    return model, ids, pos, labels, loss_mask


def test_mtp_depth_losses_equal_a_step_by_step_reference(tiny_spec):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4cli.compat.versions import mtp_tracked_losses

    model, ids, pos, labels, loss_mask = _mtp_model_and_batch(tiny_spec)
    MTPLossLoggingHelper.tracker.clear()
    with torch.no_grad():
        main = model(ids, pos, None, labels=labels, loss_mask=loss_mask)
        tracked = mtp_tracked_losses().clone()
        main_ref, reference = _mtp_reference(model, ids, pos, labels, loss_mask, n=2, h=32)
    assert (main - main_ref).abs().max().item() <= 1e-5
    assert tracked.shape == (2,)
    diffs = [abs(a - b.item()) for a, b in zip(tracked.tolist(), reference)]
    assert max(diffs) <= 1e-5, f"per-depth MTP losses {tracked.tolist()} vs reference {reference}"


def test_mtp_gradients_are_loss_scale_over_depth_times_each_depths_loss(tiny_spec):
    """Only the MTP losses backpropagate (main loss x 0): depth k's head sees (loss_scale / D) * dCE_k,
    the decoder's head sees nothing (MTP consumes the un-contracted streams, not the decoder head)."""
    loss_scale, depth = 0.3, 2  # (conftest restores megatron's MTP backward scale of a fresh process)
    model, ids, pos, labels, loss_mask = _mtp_model_and_batch(tiny_spec, loss_scale)
    main = model(ids, pos, None, labels=labels, loss_mask=loss_mask)
    (main * 0.0).sum().backward()
    _, reference = _mtp_reference(model, ids, pos, labels, loss_mask, n=2, h=32)
    assert torch.count_nonzero(model.decoder.hc_head_fn.grad) == 0
    for k, (mtp, loss_k) in enumerate(zip(model.mtp.layers, reference), start=1):
        (expected,) = torch.autograd.grad(loss_k * (loss_scale / depth), mtp.hc_head_fn)
        got = mtp.hc_head_fn.grad
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-8), (k, (got - expected).abs().max().item())
