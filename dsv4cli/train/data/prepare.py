"""`dsv4 prepare-data`: JSON lines -> a megatron indexed dataset (PREFIX.bin / PREFIX.idx)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from dsv4cli.train.data.errors import DataError
from dsv4cli.train.data.tokenizers import encode_document, make_tokenizer


def prepare_data(input_jsonl: str, out_prefix: str, tokenizer: str = "byte", key: str = "text",
                 vocab_size: Optional[int] = None) -> dict:
    """JSON lines -> Megatron indexed dataset OUT_PREFIX.bin/.idx (one document per line + eod).

    Written to temporary files beside the target, then renamed. -> {"documents", "tokens", ...}.
    Without `vocab_size` the byte tokenizer's eod is NUL (the ids fit a model with vocab_size 256)
    and a tokenizer.json may have any size.
    """
    src = Path(input_jsonl)
    if not src.is_file():
        raise DataError(f"{input_jsonl}: no such file")
    tok = make_tokenizer(tokenizer, vocab_size or (256 if tokenizer == "byte" else 2**31))
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.int32
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
    docs = tokens = 0
    try:
        with src.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{input_jsonl}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], str):
                    raise DataError(f"{input_jsonl}:{lineno}: no string field '{key}' (use --key)")
                ids = encode_document(tok, obj[key])
                builder.add_document(torch.from_numpy(ids.astype(dtype)), [len(ids)])
                docs += 1
                tokens += len(ids)
        if docs == 0:
            raise DataError(f"{input_jsonl}: no documents")
        builder.finalize(str(tmp) + ".idx")
        os.replace(str(tmp) + ".bin", str(out) + ".bin")
        os.replace(str(tmp) + ".idx", str(out) + ".idx")
    finally:
        for ext in (".bin", ".idx"):
            Path(str(tmp) + ext).unlink(missing_ok=True)
    return {"prefix": str(out), "documents": docs, "tokens": tokens, "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size, "eod": tok.eod}
