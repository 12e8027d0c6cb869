"""`--verify`'s model half: HF transformers' `DeepseekV4ForCausalLM` and dsv4's model on the same few
token sequences, compared layer by layer (docs/interop.md, "What each check proves").

transformers is optional (the `hf` extra): it is imported here, inside `compare_models`, and
nowhere else in dsv4cli; without it the comparison reports that it did not run and why.

    HF side    DeepseekV4ForCausalLM.from_pretrained(HF_DIR), output_hidden_states=True:
               hidden_states[0] (embeddings, [b, s, n, h]), each decoder layer's output [b, s, n, h]
               (forward hooks), hidden_states[-1] (final norm of the contraction, [b, s, h]), logits
    dsv4 side  the checkpoint loaded as `dsv4 generate` loads it (generate.load_for_inference); forward
               hooks on the embedding ([s, b, h]), each decoder layer ([s, b, n*h], stream-major) and
               the final norm ([s, b, h]); logits over the real vocabulary

The two models run one after the other (never both in memory), on the GPU when there is one. Per
row: the max abs difference and the smallest cosine similarity over the sequences (flattened, fp64).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

SEQUENCES = 3
SEQ_LEN = 32
SEED = 1234
INSTALL_HINT = "pip install 'dsv4[hf]'"


@dataclass(frozen=True)
class Tolerance:
    """A row passes when cosine >= min_cosine and, with `atol` set, max_abs_diff <= atol + rtol * max|HF's value|."""

    min_cosine: float
    atol: Optional[float] = None
    rtol: float = 0.0


TOLERANCES = {
    "float32": Tolerance(min_cosine=1 - 1e-6, atol=1e-4, rtol=1e-4),
    "bfloat16": Tolerance(min_cosine=0.99),
    "float16": Tolerance(min_cosine=0.995),
    "fp8": Tolerance(min_cosine=0.95),
}
"""By the dtype both models compute in. fp32: tight (the two implementations agree to rounding: ~1e-6
on the tiny test model). 16 bits: the cosine only, as rounding differences flip discrete choices (an
expert or an indexer entry on a near tie) that move single positions far (the tiny test model in bf16:
max abs diff ~0.6 on values ~3, cosine >= 0.997). fp8: an export whose config.json has a
`quantization_config` (HF runs its weights dequantized, dsv4 the checkpoint's): e4m3 keeps 3 mantissa
bits (each weight rounded by up to 1/16 of itself), which the tiny random test model turns into a
cosine of ~0.98 at the logits; a tensor in the wrong place gives far less (two layers' `wo_b`
swapped: 0.11)."""


@dataclass
class ModelRow:
    name: str
    max_abs_diff: float
    cosine: float
    limit: Optional[float]
    ok: bool


def sequences(vocab: int, length: int = SEQ_LEN, count: int = SEQUENCES, seed: int = SEED) -> list[list[int]]:
    """`count` fixed random token sequences of `length` from a generator seeded with `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _hooks(named_modules):
    """Capture each module's output (first element of a tuple) on CPU: yields {name: [outputs]}."""
    captured: dict[str, list] = {name: [] for name, _ in named_modules}
    handles = [m.register_forward_hook(lambda mod, args, out, n=name: captured[n].append(_first(out).detach().cpu()))
               for name, m in named_modules]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def hf_outputs(hf_dir: Path, seqs: list[list[int]], device, dtype) -> tuple[list[dict], str]:
    """HF's rows per sequence: {"embeddings", "layer i", "final norm": [s, ...], "logits": [s, V]}, computed
    in `dtype` (dsv4's: both sides round alike; HF keeps its fp32 modules fp32 as dsv4 does); and that dtype."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    with contextlib.redirect_stdout(sys.stderr):  # --json: stdout holds one JSON object only
        model = DeepseekV4ForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    outs = []
    with _hooks([(f"layer {i}", layer) for i, layer in enumerate(model.model.layers)]) as got, torch.no_grad():
        for seq in seqs:
            o = model(torch.tensor([seq], device=device), output_hidden_states=True)
            row = {"embeddings": o.hidden_states[0][0, :, 0].cpu()}  # the streams are copies of it
            row.update({name: values.pop()[0] for name, values in got.items()})
            row["final norm"] = o.hidden_states[-1][0].cpu()
            row["logits"] = o.logits[0].cpu()
            outs.append(row)
    del model
    return outs, dtype


def dsv4_outputs(spec, load: str, seqs: list[list[int]]) -> tuple[list[dict], str]:
    """dsv4's rows per sequence, in HF's shapes ([s, h], [s, n, h], [s, V]); and its compute dtype."""
    import torch

    from dsv4cli.build.parallel import single_process
    from dsv4cli.infer.generate import load_for_inference, logits_of

    outs = []
    with single_process(spec, seed=0):
        model = load_for_inference(spec, load)
        dtype = str(model.embedding.word_embeddings.weight.dtype).removeprefix("torch.")
        n = spec.model.mhc.streams
        watched = [("embeddings", model.embedding), ("final norm", model.decoder._modules["final_layernorm"])]
        watched += [(f"layer {i}", layer) for i, layer in enumerate(model.decoder.layers)]
        with _hooks(watched) as got:
            for seq in seqs:
                logits = logits_of(model, seq, spec.model.vocab_size).cpu()
                row = {name: values.pop()[:, 0] for name, values in got.items()}  # [s, b, ...] -> [s, ...]
                row.update({k: v.reshape(v.shape[0], n, -1) for k, v in row.items() if k.startswith("layer")})
                row["logits"] = logits
                outs.append(row)
        del model
    return outs, dtype


def common_dtype(hf_dir: Path, ours):
    """The dtype HF's model runs in: the checkpoint's (`ours`), or the 16-bit dtype config.json's `dtype`
    names when the checkpoint is fp32 (an export cast with --dtype: its files hold the rounded weights)."""
    import torch

    from dsv4cli.infer.hf_config import read_json

    cfg = read_json(hf_dir / "config.json")
    theirs = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)
    return theirs if ours == torch.float32 and theirs in (torch.bfloat16, torch.float16) else ours


def _row(name: str, theirs: list, ours: list, tol: Tolerance) -> ModelRow:
    import torch

    diff, cos, scale = 0.0, 1.0, 0.0
    for a, b in zip(theirs, ours):
        a, b = a.double().flatten(), b.double().flatten()
        diff = max(diff, (a - b).abs().max().item())
        cos = min(cos, torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-30).item())
        scale = max(scale, a.abs().max().item())
    limit = None if tol.atol is None else tol.atol + tol.rtol * scale
    return ModelRow(name, diff, cos, limit, (limit is None or diff <= limit) and cos >= tol.min_cosine)


def compare_models(hf_dir: str | Path, spec, load: str, seqs: Optional[list[list[int]]] = None) -> dict:
    """-> {"ran": True, "dtype", "tolerance", "sequences", "layers": [rows], "logits": row, "ok"}, or
    {"ran": False, "reason"} when transformers is not installed or cannot load `hf_dir`."""
    try:
        import transformers  # noqa: F401  (the optional `hf` extra)
    except ImportError:
        return {"ran": False, "reason": f"the model comparison needs transformers: {INSTALL_HINT}"}
    from dsv4cli.ckpt.layout import resolve_checkpoint
    from dsv4cli.compat.device import local_device
    from dsv4cli.infer.generate import checkpoint_dtype
    from dsv4cli.infer.hf_config import read_json

    seqs = seqs if seqs is not None else sequences(spec.model.vocab_size, min(SEQ_LEN, spec.model.seq_length))
    try:
        theirs, hf_dtype = hf_outputs(Path(hf_dir), seqs, local_device(),
                                      common_dtype(Path(hf_dir), checkpoint_dtype(resolve_checkpoint(load).iter_dir)))
    except Exception as e:  # transformers' own refusal (a config or layout it cannot load)
        return {"ran": False, "reason": f"transformers cannot load {hf_dir}: {type(e).__name__}: {e}".splitlines()[0]}
    ours, dtype = dsv4_outputs(spec, load, seqs)
    quantized = "quantization_config" in read_json(Path(hf_dir) / "config.json")
    tol = TOLERANCES["fp8"] if quantized else TOLERANCES.get(hf_dtype, TOLERANCES["bfloat16"])  # HF's is the lower
    names = [k for k in theirs[0] if k != "logits"]
    layers = [_row(k, [t[k] for t in theirs], [o[k] for o in ours], tol) for k in names]
    logits = _row("logits", [t["logits"] for t in theirs], [o["logits"] for o in ours], tol)
    return {"ran": True, "dtype": {"hf": hf_dtype, "dsv4": dtype}, "tolerance": asdict(tol), "sequences": len(seqs),
            "layers": [asdict(r) for r in layers], "logits": asdict(logits),
            "ok": all(r.ok for r in layers) and logits.ok}
