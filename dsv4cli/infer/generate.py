"""`dsv4 generate`: decode from a checkpoint with dsv4's own Megatron-Core model in one process.

The model is built from the spec (one process: CPU, or one GPU when there is one), the
checkpoint's model weights are loaded as `dsv4 eval` loads them (no optimizer state), and every
step runs a full forward pass over the whole sequence (no KV cache). Computation is in the
checkpoint's dtype (that of its word embeddings; mHC and contraction parameters stay fp32).
Argmax, sampling and log-softmax cover the real vocabulary `model.vocab_size`, never the rows that
pad it. Decoding stops after an id of `data.eos_token_ids` (which is kept, as HF's `generate`
keeps it) or after `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dsv4cli.ckpt.keys import EMBEDDING_KEY



@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (argmax) for temperature 0, else sampled from the
    temperature-scaled distribution cut to its top-p nucleus, with a seeded generator."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def checkpoint_dtype(iter_dir):
    """torch dtype of the checkpoint's word embeddings (float32 when it has none)."""
    import torch

    from dsv4cli.ckpt.metadata import read_checkpoint_info

    entry = read_checkpoint_info(iter_dir).tensors.get(EMBEDDING_KEY)
    return getattr(torch, entry.dtype) if entry is not None else torch.float32


def load_for_inference(spec, load: str):
    """Build the spec's model in this (one-process) world and load the checkpoint's weights.

    Call inside `dsv4cli.build.parallel.single_process(spec)`. -> the model chunk in eval mode, its
    parameters in the checkpoint's dtype. CheckpointError for a damaged or mismatched checkpoint.
    """
    from dsv4cli.build.parallel import build_model_chunks
    from dsv4cli.ckpt.conformance import check_tensors, expected_shapes
    from dsv4cli.ckpt.integrity import check_integrity
    from dsv4cli.ckpt.layout import resolve_checkpoint
    from dsv4cli.ckpt.load import load_model_weights
    from dsv4cli.spec.layout import single_process_spec

    iter_dir = resolve_checkpoint(load).iter_dir
    check_integrity(iter_dir, loading=True)
    chunks = build_model_chunks(single_process_spec(spec))
    check_tensors(iter_dir, expected_shapes(chunks))
    dtype = checkpoint_dtype(iter_dir)
    for chunk in chunks:
        chunk.to(dtype)  # mHC/contraction parameters stay fp32 (model/fp32_params.py)
    load_model_weights(iter_dir, chunks)
    model = chunks[0]
    model.eval()
    return model


def logits_of(model, tokens: list[int], vocab_size: int):
    """Main-model logits of one sequence over the real vocabulary: [len(tokens), vocab_size] (fp32)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(len(tokens), dtype=torch.long, device=device).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids, positions, attention_mask=None)  # [1, s, padded vocab]
    return logits[0, :, :vocab_size].float()


def prompt_logprobs(logits, prompt: list[int]) -> list[float]:
    """log p(prompt[i+1] | prompt[:i+1]) for i = 0 .. len(prompt) - 2, from the prompt's logits [s, V]."""
    import torch

    if len(prompt) < 2:
        return []
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
    return logp.gather(1, target.unsqueeze(1)).squeeze(1).tolist()


def choose(row, sampling: Sampling, generator) -> int:
    """Next token from one logits row [V]: argmax (temperature 0), else a draw from the top-p nucleus
    of softmax(row / temperature)."""
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(row).item())
    probs = torch.softmax(row.double() / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p  # the smallest set reaching top_p
        keep[0] = True  # the most likely token always stays (top_p = 0 means greedy among the draws)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


def decode(model, prompt: list[int], vocab_size: int, eos_ids, sampling: Sampling) -> dict:
    """-> {"tokens": generated ids, "prompt_logprobs": [...]}: one full forward pass per new token."""
    import torch

    generator = torch.Generator().manual_seed(sampling.seed)
    eos = set(eos_ids)
    sequence = list(prompt)
    generated: list[int] = []
    logits = logits_of(model, sequence, vocab_size)
    logprobs = prompt_logprobs(logits, prompt)
    for step in range(sampling.max_new_tokens):
        if step:
            logits = logits_of(model, sequence, vocab_size)
        token = choose(logits[-1], sampling, generator)
        generated.append(token)
        sequence.append(token)
        if token in eos:
            break
    return {"tokens": generated, "prompt_logprobs": logprobs}


def tokenizer_of(spec):
    """The spec's tokenizer, or None when it cannot serve this model (e.g. bytes for a vocabulary < 256)."""
    from dsv4cli.train.data import DataError
    from dsv4cli.train.data.tokenizers import make_tokenizer

    try:
        return make_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    except DataError:
        return None


def generate(spec, load: str, prompt: list[int], sampling: Sampling, tokenizer=None) -> dict:
    """Load `load` under `spec` in one process and continue `prompt` (token ids, used as given).
    `tokenizer` decodes the generated ids (default: the spec's, tokenizer_of).

    -> {"tokens": [generated ids], "text": decoded tokens or None without a tokenizer,
        "prompt_logprobs": [log p(prompt[i+1] | prompt[:i+1])]}.
    """
    from dsv4cli.build.parallel import single_process

    bad = [t for t in prompt if not 0 <= t < spec.model.vocab_size]
    if not prompt or bad:
        raise ValueError(f"prompt token ids must lie in 0..{spec.model.vocab_size - 1}"
                         + (f", got {bad[:5]}" if bad else ", got none"))
    with single_process(spec, seed=spec.train.seed):
        model = load_for_inference(spec, load)
        out = decode(model, prompt, spec.model.vocab_size, spec.data.eos_token_ids, sampling)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(spec)
    text: Optional[str] = tokenizer.decode(out["tokens"]) if tokenizer is not None else None
    return {"tokens": out["tokens"], "text": text, "prompt_logprobs": out["prompt_logprobs"]}
