"""DeepSeek-V4 attention under tensor parallelism 2 (2 CPU processes) equals one process.

Every rank builds the TP=1 layer (on a one-rank group) with random values in every parameter (sinks,
norm weights and position biases included) and the TP=2 layer holding its slices of them. With and
without sequence parallelism, for each attention kind (the CSA layer with its indexer loss):
- the output (or this rank's sequence slice of it) and the input gradient equal TP=1's,
- split parameters' gradients equal the slice of TP=1's; replicated parameters' gradients (KV head,
  compressors, query down-projection) equal TP=1's whole gradient on both ranks,
- the indexer's scores and top-k indices equal TP=1's exactly (scores summed in head order),
- the indexer loss equals TP=1's,
- the sharded state dict has TP=1's keys and global shapes, split tensors in 2 fragments.
`chain_sum` over 64 terms of very different magnitudes (where torch's `sum(dim=0)` is not a
left-to-right chain) equals the one-process left-to-right loop bit for bit on both ranks, and each
rank's terms get the total's gradient.
"""

from __future__ import annotations

import pytest
import torch

from test_dsv4_attention import BATCH, HEADS, HIDDEN, SEQ, randomise, settings

TOL = 1e-5
KINDS = [("sliding", 0), ("compressed_sparse", 4), ("heavily_compressed", 16)]


def _config(sequence_parallel: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, layernorm_epsilon=1e-6,
                             use_cpu_initialization=True, tensor_model_parallel_size=2,
                             sequence_parallel=sequence_parallel)


def _slice(full: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """The part of a TP=1 tensor a rank holds: split along the one dim whose size differs."""
    dims = [d for d in range(full.dim()) if full.shape[d] != local.shape[d]]
    return full.chunk(2, dim=dims[0])[rank] if dims else full


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _case(kind: str, ratio: int, sequence_parallel: bool, one_rank_group, rank: int) -> dict:
    from types import SimpleNamespace

    from dsv4cli.model.dsv4.attention import Dsv4Attention

    s = settings(kind, ratio)
    if kind == "compressed_sparse":
        from dataclasses import replace

        s = replace(s, indexer_loss_weight=1.0)
    config = _config(sequence_parallel)
    ref = Dsv4Attention(config, s, pg_collection=SimpleNamespace(tp=one_rank_group))
    tp = Dsv4Attention(config, s)
    assert ref.tp.size == 1 and tp.tp.size == 2 and tp.local_heads == HEADS // 2
    randomise(ref, torch.Generator().manual_seed(3))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in tp.named_parameters():
            p.copy_(_slice(ref_params[name], p, rank))
    captured = {}
    for module, key in ((ref, "ref"), (tp, "tp")):
        if module.indexer is not None:
            module.indexer.register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out))
        module.train()

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    cotangent = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    local = (lambda t: t.chunk(2, dim=0)[rank]) if sequence_parallel else (lambda t: t)
    x_ref, x_tp = x.clone().requires_grad_(), local(x).clone().requires_grad_()
    out_ref, _ = ref(x_ref)
    out_tp, _ = tp(x_tp)
    (out_ref * cotangent).sum().backward()
    (out_tp * local(cotangent)).sum().backward()

    split = {n for n, p in tp.named_parameters() if p.shape != ref_params[n].shape}
    result = {
        "output": _max_diff(out_tp, local(out_ref)),
        "input_grad": _max_diff(x_tp.grad, local(x_ref.grad)),
        "grads": {n: _max_diff(p.grad, _slice(ref_params[n].grad, p, rank)) for n, p in tp.named_parameters()},
        "split": sorted(split),
        "tp_attr": sorted(n for n, p in tp.named_parameters() if getattr(p, "tensor_model_parallel", False)),
    }
    if tp.indexer is not None:
        result["scores"] = _max_diff(captured["tp"].scores, captured["ref"].scores)
        result["topk_equal"] = bool(torch.equal(captured["tp"].topk, captured["ref"].topk))
        result["indexer_loss"] = abs(float(tp.indexer_loss_sum) - float(ref.indexer_loss_sum))
        result["indexer_loss_value"] = float(ref.indexer_loss_sum)
    sharded, ref_sharded = tp.sharded_state_dict(prefix="a."), ref.sharded_state_dict(prefix="a.")
    result["keys_equal"] = sorted(sharded) == sorted(ref_sharded)
    result["global_shapes_equal"] = all(tuple(sharded[k].global_shape) == tuple(ref_sharded[k].global_shape)
                                        for k in sharded)
    result["fragments"] = {k: list(sharded[k].axis_fragmentations) for k in sharded}
    return result


def _chain(rank: int) -> dict:
    from types import SimpleNamespace

    from dsv4cli.model.dsv4.tp_split import chain_sum, tp_group

    scale = torch.logspace(-3, 3, 64)[:, None, None, None]
    terms = torch.randn(64, 5, 2, 7, generator=torch.Generator().manual_seed(5)) * scale
    loop = terms[0]
    for term in terms[1:]:
        loop = loop + term
    tp = tp_group(SimpleNamespace(sequence_parallel=False))
    assert tp.size == 2
    local = terms.chunk(2)[rank].clone().requires_grad_()
    total = chain_sum(iter(local), tp)
    cotangent = torch.randn(5, 2, 7, generator=torch.Generator().manual_seed(6))
    (total * cotangent).sum().backward()
    return {"equal_loop": bool(torch.equal(total, loop)), "sum_dim0_differs": not torch.equal(terms.sum(dim=0), loop),
            "grad_equal": bool(torch.equal(local.grad, cotangent.expand_as(local)))}


def worker(args: dict) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    import dsv4cli.compat as compat
    from dsv4cli.build.parallel import init_process_group

    compat.activate()
    init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        out = {f"{kind}/{sp}": _case(kind, ratio, sp, singles[rank], tp_rank)
               for kind, ratio in KINDS for sp in (False, True)}
        return {**out, "chain": _chain(tp_rank)}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def results():
    from distributed import run_distributed

    return run_distributed("test_dsv4_attention_tp:worker", {})


REPLICATED = ("linear_q_down.weight", "q_norm.weight", "linear_kv.weight", "kv_norm.weight")
SPLIT = ("linear_q_up.weight", "linear_o_down.weight", "linear_o_up.weight", "sinks")


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_attention_equals_one_process(results, kind, sp):
    for rank, per_rank in enumerate(results):
        r = per_rank[f"{kind}/{sp}"]
        assert r["output"] <= TOL and r["input_grad"] <= TOL, (rank, r["output"], r["input_grad"])
        bad = {n: d for n, d in r["grads"].items() if d > TOL}
        assert not bad, (rank, bad)
        expected_split = set(SPLIT)
        if kind == "compressed_sparse":
            expected_split |= {"indexer.linear_q_up.weight", "indexer.linear_weights.weight"}
        assert set(r["split"]) == set(r["tp_attr"]) == expected_split
        assert set(REPLICATED) <= set(r["grads"]) and not set(REPLICATED) & set(r["split"])
        if kind != "sliding":
            assert any(n.startswith("compressor.") for n in r["grads"])
        assert r["keys_equal"] and r["global_shapes_equal"]
        for key, fragments in r["fragments"].items():
            want = [1] * len(fragments)
            if key.removeprefix("a.") in expected_split:
                want[1 if key.endswith("linear_o_up.weight") else 0] = 2
            assert fragments == want, (key, fragments)
        if kind == "compressed_sparse":
            assert r["topk_equal"] and r["scores"] == 0.0, (rank, r["scores"])
            assert r["indexer_loss"] <= 1e-6 and r["indexer_loss_value"] > 0, r


@pytest.mark.slow
def test_chain_sum_is_the_one_process_left_to_right_sum(results):
    for rank, per_rank in enumerate(results):
        r = per_rank["chain"]
        assert r["sum_dim0_differs"], "the terms must tell a chain from torch's sum"
        assert r["equal_loop"] and r["grad_equal"], (rank, r)
