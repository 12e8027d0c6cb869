"""The lightning indexer learns: its KL loss against the dense attention (value, gradient path), the
dense warm-up on the tiny DSv4 spec (the loss falls, the top-k moves toward the dense attention's
heaviest entries) and a resume in the middle of the warm-up."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_dsv4_attention import SEQ, mcore_config, randomise, settings
from test_train_dsv4 import straight_and_resumed
from test_train_e2e import REPO

from dsv4cli.model.dsv4.indexer_loss import attention_modules, set_iteration

SPEC = str(REPO / "specs" / "tiny-dsv4.toml")


class Recorder:
    """Wraps attention.attention_probs and hooks the indexer: the module's own probabilities and scores."""

    def __init__(self, monkeypatch, attention_module):
        from dsv4cli.model.dsv4 import attention as att

        self.probs, self.scores, self.topk = [], [], []
        self.inside = False  # only this module's calls are recorded
        real = att.attention_probs

        def recording(*args, **kwargs):
            p = real(*args, **kwargs)
            if self.inside:
                self.probs.append(p.detach())
            return p

        attention_module.register_forward_pre_hook(lambda *_: setattr(self, "inside", True))
        attention_module.register_forward_hook(lambda *_: setattr(self, "inside", False))

        monkeypatch.setattr(att, "attention_probs", recording)
        attention_module.indexer.register_forward_hook(self.hook)

    def hook(self, module, inputs, out) -> None:
        self.scores.append(out.scores.detach())
        self.topk.append(out.topk)


def reference_kl(scores: torch.Tensor, probs: torch.Tensor, ratio: int) -> torch.Tensor:
    """Plain loops: scores [s, b, n], probs [b, H, s, s + n] -> mean over (b, t) seeing entries of KL(p || q)."""
    s, b, n = scores.shape
    terms = []
    for bi in range(b):
        for t in range(s):
            w = min((t + 1) // ratio, n)
            if w == 0:
                continue
            p = probs[bi, :, t, s : s + w].double().sum(0)
            p = p / p.sum()
            log_q = torch.log_softmax(scores[t, bi, :w].double(), dim=0)
            terms.append((p * (p.log() - log_q)).sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("dense", [True, False])
def test_indexer_loss_is_the_kl_to_the_dense_attention_and_trains_only_the_indexer(monkeypatch, dense):
    from dsv4cli.model.dsv4.attention import Dsv4Attention

    torch.manual_seed(0)
    cfg = dataclasses.replace(settings("compressed_sparse", 4), indexer_loss_weight=0.5, indexer_warmup_steps=3)
    module = Dsv4Attention(mcore_config(), cfg)
    randomise(module, torch.Generator().manual_seed(1))
    module.iteration = 2 if dense else 3  # iterations 0..2 are the warm-up
    rec = Recorder(monkeypatch, module)
    x = torch.randn(SEQ, 2, module.config.hidden_size, requires_grad=True)

    out, _ = module(x)
    # sparse: the step attends to the top-k, the loss's target is a second, dense pass
    assert len(rec.probs) == (1 if dense else 2) and module.indexer_loss_count == 1
    target = rec.probs[-1]
    n = target.shape[-1] - SEQ
    assert bool((target[..., SEQ:].sum(-1) > 0).any())
    visible_entries = (target[..., SEQ:] > 0).sum(-1)  # [b, H, s]: every visible entry is attended densely
    assert torch.equal(visible_entries[0, 0], ((torch.arange(SEQ) + 1) // 4).clamp(max=n))
    expected = reference_kl(rec.scores[0], target, ratio=4)
    assert abs(float(module.indexer_loss_sum) - expected.item()) <= 1e-6, (float(module.indexer_loss_sum), expected)
    assert expected.item() > 1e-3  # a random indexer is far from the attention

    # the loss enters the backward through the output; no gradient of the output itself here
    (out * 0).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith("indexer."))
    assert all(g is None or g.abs().sum() == 0 for name, g in grads.items() if not name.startswith("indexer."))
    assert x.grad is None or x.grad.abs().sum() == 0  # the indexer's inputs are detached

    # the loss does not change the forward; weight 0 (the default) computes no loss
    frozen = Dsv4Attention(mcore_config(), dataclasses.replace(cfg, indexer_loss_weight=0.0))
    frozen.load_state_dict(module.state_dict())
    frozen.iteration = module.iteration
    assert torch.equal(frozen.attend(x.detach()), out.detach()) and frozen.indexer_loss_count == 0


def _tiny_dsv4(warmup: int):
    from dsv4cli.build import build_model
    from dsv4cli.spec.load import load_spec

    spec = load_spec(SPEC, [f"model.attention.indexer_warmup_steps={warmup}"])
    torch.manual_seed(spec.train.seed)
    return spec, build_model(spec)


def _text_windows(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[count, length] byte tokens from random places of the builtin corpus (Python's stdlib)."""
    from dsv4cli.train.data.builtin import stdlib_documents, stdlib_root

    docs = [(stdlib_root() / d).read_bytes() for d in stdlib_documents()[:40]]
    text = torch.tensor(list(b"\n".join(docs)[:400_000]))
    starts = torch.randint(0, text.numel() - length, (count,), generator=generator)
    return torch.stack([text[i : i + length] for i in starts.tolist()])


def _overlap(model, rec: Recorder, tokens: torch.Tensor, k: int) -> float:
    """Share of the dense attention's k heaviest entries that the indexer's top-k picks (queries with > k entries)."""
    rec.probs.clear(), rec.topk.clear()
    model.eval()
    with torch.no_grad():
        for iteration in (None, 0):  # sparse: the indexer's top-k; dense: the attention weighs every visible entry
            set_iteration(attention_modules([model]), iteration)
            model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    model.train()
    assert len(rec.topk) == 1, "a dense pass without a loss does not run the indexer"
    probs, topk = rec.probs[-1], rec.topk[-1]  # [b, H, s, s + n], [s, b, k]
    s = topk.shape[0]
    heavy = probs[..., s:].sum(1).topk(k, dim=-1).indices.permute(1, 0, 2)  # [s, b, k]
    many = (torch.arange(s) + 1) // 4 > k  # queries with a real choice
    hits = (topk[many][..., :, None] == heavy[many][..., None, :]).any(-1).float()
    return hits.mean().item()


def test_dense_warmup_lowers_the_indexer_loss_and_aligns_its_top_k(megatron_1proc, monkeypatch):
    from dsv4cli.model.dsv4.indexer_loss import take_indexer_losses

    spec, model = _tiny_dsv4(warmup=100)
    attention = attention_modules([model])
    csa = [m for m in attention if m.indexer is not None]
    assert len(csa) == 1 and csa[0].settings.indexer_loss_weight > 0
    rec = Recorder(monkeypatch, csa[0])
    g = torch.Generator().manual_seed(0)
    b, s, k = 4, spec.model.seq_length, spec.model.attention.index_topk
    fixed = _text_windows(b, s, g)
    before = _overlap(model, rec, fixed, k)

    opt = torch.optim.Adam(csa[0].indexer.parameters(), lr=1e-2)  # the warm-up trains the indexer alone
    history = []
    for it in range(12):
        set_iteration(attention, it)
        rec.probs.clear()
        tokens = _text_windows(b, s + 1, g)
        pos = torch.arange(s).expand(b, s)
        opt.zero_grad()
        model(tokens[:, :-1], pos, attention_mask=None, labels=tokens[:, 1:]).mean().backward()
        opt.step()
        assert len(rec.probs) == 1  # dense: one attention pass, no sparse one
        total, layers = take_indexer_losses(attention)
        history.append(total / layers)
    after = _overlap(model, rec, fixed, k)
    print(f"indexer loss {[round(h, 4) for h in history]}; top-{k} overlap {before:.3f} -> {after:.3f}")
    assert sum(history[-3:]) / 3 < 0.85 * sum(history[:3]) / 3, history
    assert after > before + 0.05, (before, after)


@pytest.mark.slow
def test_resume_in_the_middle_of_the_dense_warmup_is_bit_exact(tmp_path):
    common = ["--set", "train.steps=4", "--set", "train.eval_interval=0", "--set", "train.log_interval=1",
              "--set", "train.warmup_steps=1", "--set", "model.attention.indexer_warmup_steps=3",
              "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2"]
    a, b, second = straight_and_resumed(tmp_path, common)
    assert "idx " in second.stdout  # the progress line shows it
    for x, y in zip(a, b):
        for key in ("loss", "mtp_losses", "grad_norm", "indexer_loss"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
    assert a[2]["indexer_loss"] != a[3]["indexer_loss"]
