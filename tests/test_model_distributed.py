"""TP=2 (with and without sequence parallelism) and PP=2 (default split and a pp_layout) under torchrun (2 processes, gloo, CPU) give
the loss, per-depth MTP losses and gradients of one process for the same weights and batch; and
a FRESH model (no weights loaded) under PP=2, VPP=2 and TP=2 equals the one-process fresh model
of the same seed (the reference below is built fresh).

The one-process reference saves its weights with megatron dist_checkpointing (torch_dist); each
2-process case loads them resharded, so this also exercises our sharded_state_dict under TP/PP.
"""

from __future__ import annotations

import pytest
import torch

S, B, SEED = 16, 2, 21
MODELS = {
    "mhc": {"model.mhc.streams": 4, "model.mtp.depth": 1, "model.contraction.mode": "learned"},
    "moe": {"model.mhc.streams": 2, "model.mtp.depth": 1,
            "model.moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "expert_ffn_hidden_size": 16}},
    # DeepSeek-V4's blocks: per-layer attention kinds (decoder: sliding, CSA; MTP: HCA), hash routing on
    # layer 0, sqrt(softplus) top-k elsewhere, the SwiGLU clamp; per-layer checkpoint keys
    "dsv4": {"model.mhc.streams": 2, "model.mtp.depth": 1,
             "model.attention": {"layer_types": ["sliding", "csa", "hca"], "compress_ratios": [0, 4, 8],
                                 "head_dim": 16, "rope_head_dim": 8, "q_lora_rank": 16, "o_groups": 2,
                                 "o_lora_rank": 8, "sliding_window": 8, "index_n_heads": 2, "index_head_dim": 8,
                                 "index_topk": 2},
             "model.moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "expert_ffn_hidden_size": 16,
                           "score_function": "sqrtsoftplus", "hash_layers": 1, "swiglu_limit": 1.0}},
}
CASES = {  # case -> (model, parallel layout)
    "tp2": ("mhc", {"parallel.tp": 2}),
    "tp2_sp": ("mhc", {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    # recompute must not change anything: mHC mappings and norm outputs recomputed under TP + SP
    "tp2_sp_recompute": ("mhc", {"parallel.tp": 2, "parallel.sequence_parallel": True,
                                 "train.recompute": ["mhc", "layernorm", "mlp"]}),
    "pp2": ("mhc", {"parallel.pp": 2}),
    # all decoder layers on stage 0; stage 1 holds only MTP, contraction, final norm and loss
    "pp2_layout": ("mhc", {"parallel.pp": 2, "parallel.pp_layout": "Ett|mL"}),
    # interleaved schedule: 2 virtual stages per rank (embedding alone first, MTP + loss last)
    "vpp2_layout": ("mhc", {"parallel.pp": 2, "parallel.vpp": 2, "parallel.pp_layout": "E|t|t|mL"}),
    # experts split over 2 ranks (all-to-all dispatch); both ranks see the same batch
    "ep2": ("moe", {"parallel.ep": 2}),
    # fresh initialisation (no weights loaded): each unit draws from (seed, unit), so the same seed
    # gives the one-process model under any PP/VPP/TP layout (dsv4cli/model/init_seed.py)
    "fresh_pp2": ("mhc", {"parallel.pp": 2}),
    "fresh_pp2_layout": ("mhc", {"parallel.pp": 2, "parallel.pp_layout": "Ett|mL"}),
    "fresh_vpp2_layout": ("mhc", {"parallel.pp": 2, "parallel.vpp": 2, "parallel.pp_layout": "E|t|t|mL"}),
    "fresh_tp2": ("mhc", {"parallel.tp": 2}),
    "dsv4_pp2": ("dsv4", {"parallel.pp": 2}),
    "fresh_dsv4_pp2": ("dsv4", {"parallel.pp": 2}),
}


def _batch():
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 256, (B, S), generator=g)
    return ids, torch.arange(S).expand(B, S).contiguous()


def _global_named_params(model):
    """name -> param with decoder layer indices made global (PP stages number their layers from 0)."""
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            layer = model.decoder.layers[int(local)]
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        out[name] = p
    return out


def _mtp_losses():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("values")
    return None if values is None else values.tolist()


def _clear_mtp_tracker():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()


def worker(args: dict) -> dict:
    """Runs in every torchrun rank: each case builds, loads the reference weights, runs fwd+bwd."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from conftest import make_tiny_spec
    from dsv4cli.build import build_model_chunks, initialize_parallel

    results = {}
    for case in args["cases"]:
        model_key, layout = CASES[case]
        reference = torch.load(args["references"][model_key]["file"], weights_only=False)
        spec = make_tiny_spec(**MODELS[model_key], **layout)
        initialize_parallel(spec, seed=SEED)
        torch.manual_seed(SEED)  # the builder seeds each unit from (this seed, unit)
        _clear_mtp_tracker()
        chunks = build_model_chunks(spec)
        if not case.startswith("fresh_"):
            # all chunks of a rank load in ONE call (their sharded state dicts are disjoint)
            sharded = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
            loaded = dist_checkpointing.load(sharded, args["references"][model_key]["ckpt"])
            for i, c in enumerate(chunks):
                c.load_state_dict(loaded[f"chunk{i}"], strict=False)
        for c in chunks:
            c.train()
        microbatches = 2 if len(chunks) > 1 else 1  # the interleaved schedule wants >= pp microbatches
        ids, pos = _batch()
        losses = []

        def forward_step(data_iterator, chunk):
            out = chunk(ids, pos, None, labels=ids)

            def loss_func(output):
                loss = output.float().mean()
                losses.append(loss.detach().clone())
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([None] * microbatches) for _ in chunks],
            model=chunks, num_microbatches=microbatches, seq_length=S, micro_batch_size=B, forward_only=False,
        )
        tp_group = parallel_state.get_tensor_model_parallel_group()
        compared, worst = [], 0.0
        params = {}
        for c in chunks:
            params.update(_global_named_params(c))
        for name, p in params.items():
            if (getattr(p, "tensor_model_parallel", False) or not getattr(p, "allreduce", True)
                    or name == "embedding.word_embeddings.weight"):
                continue  # TP shards, EP experts and the PP-tied embedding copy are not comparable one to one
            if p.grad is None or reference["grads"][name] is None:  # the DSv4 indexer: no gradient on either side
                assert p.grad is None and reference["grads"][name] is None, name
                continue
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False) and spec.parallel.sequence_parallel:
                dist.all_reduce(grad, group=tp_group)  # what finalize_model_grads does under SP
            worst = max(worst, (grad - reference["grads"][name]).abs().max().item())
            compared.append(name)
        results[case] = {
            "loss": losses[0].item() if losses else None,
            "mtp": [v / microbatches for v in _mtp_losses()] if losses else None,
            "grad_max_diff": worst,
            "grads_compared": compared,
        }
        del chunks
    return results


def _reference(model_key, root):
    """One-process loss, MTP losses and grads; weights saved as a torch_dist checkpoint under root."""
    from megatron.core import dist_checkpointing, tensor_parallel

    from conftest import make_tiny_spec
    from dsv4cli.build import build_model

    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    torch.manual_seed(SEED)
    model = build_model(make_tiny_spec(**MODELS[model_key]))
    model.train()
    _clear_mtp_tracker()
    ids, pos = _batch()
    loss = model(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    ckpt = root / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    # the DSv4 indexer gets no gradient (a discrete top-k choice)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in _global_named_params(model).items()}
    ref = {"loss": loss.item(), "mtp": _mtp_losses(), "grads": grads}
    torch.save(ref, root / "reference.pt")
    return {**ref, "ckpt": str(ckpt), "file": str(root / "reference.pt")}


@pytest.fixture(scope="module")
def references(megatron_1proc, tmp_path_factory):
    return {key: _reference(key, tmp_path_factory.mktemp(f"ref_{key}")) for key in MODELS}


@pytest.fixture(scope="module")
def two_process_results(references):
    from distributed import run_distributed

    paths = {key: {"ckpt": r["ckpt"], "file": r["file"]} for key, r in references.items()}
    return run_distributed(
        "test_model_distributed:worker", {"cases": list(CASES), "references": paths}, nproc=2, timeout=900
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_process(references, two_process_results, case):
    reference = references[CASES[case][0]]
    per_rank = [r[case] for r in two_process_results]
    with_loss = [r for r in per_rank if r["loss"] is not None]
    assert with_loss, f"{case}: no rank computed the loss"
    for r in with_loss:
        assert abs(r["loss"] - reference["loss"]) <= 1e-5, (case, r["loss"], reference["loss"])
        assert r["mtp"] is not None and len(r["mtp"]) == 1
        assert abs(r["mtp"][0] - reference["mtp"][0]) <= 1e-5, (case, r["mtp"], reference["mtp"])
    compared = set().union(*(r["grads_compared"] for r in per_rank))
    assert any("hyper_connection" in n for n in compared) and any("hc_head" in n for n in compared)
    if CASES[case][0] in ("moe", "dsv4"):
        assert any("router" in n for n in compared)
    if CASES[case][0] == "dsv4":
        assert any(".compressor." in n for n in compared) and any("sinks" in n for n in compared)
    worst = max(r["grad_max_diff"] for r in per_rank)
    assert worst <= 1e-5, f"{case}: gradients differ from one process by {worst}"
