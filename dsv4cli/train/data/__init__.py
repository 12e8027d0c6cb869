"""Training data: the builtin stdlib corpus, HF/byte tokenizers, Megatron indexed and mock datasets.

Every source is reduced to one interface, a `SampleSource`: `len(src)` samples, and
`src[i] -> (tokens [s], labels [s], loss_mask [s])` as int64/float32 numpy arrays, deterministic
in `i`. The loop draws global batches by position (samples consumed so far), so resuming needs
only that position. Data-parallel rank r of d takes the r-th contiguous slice of each global
batch, which keeps the global batch identical for any layout.

Modules, one concern each:
    errors      DataError (bad data input, exit 2)
    tokenizers  ByteTokenizer, HFTokenizer, make_tokenizer, encode_document
    builtin     the stdlib corpus: documents, train/held-out split, TokenStream, BuiltinCorpus
    splits      megatron's train/validation split of indexed data sets and its pre-flight check
    indexed     megatron GPT datasets (indexed blend or mock) as SampleSources
    sources     a spec's DataSources (build_sources) and check_data
    batching    microbatches: this rank's slice of a global batch
    prepare     prepare_data: JSON lines -> PREFIX.bin / PREFIX.idx
"""

from dsv4cli.train.data.batching import microbatches
from dsv4cli.train.data.builtin import (
    BuiltinCorpus,
    TokenStream,
    is_heldout,
    split_documents,
    stdlib_documents,
    stdlib_root,
)
from dsv4cli.train.data.errors import DataError
from dsv4cli.train.data.indexed import MegatronSource
from dsv4cli.train.data.prepare import prepare_data
from dsv4cli.train.data.sources import DataSources, build_sources, check_data
from dsv4cli.train.data.splits import check_splits, split_document_ranges
from dsv4cli.train.data.tokenizers import ByteTokenizer, HFTokenizer, encode_document, make_tokenizer

__all__ = [
    "BuiltinCorpus", "ByteTokenizer", "DataError", "DataSources", "HFTokenizer", "MegatronSource", "TokenStream",
    "build_sources", "check_data", "check_splits", "encode_document", "is_heldout", "make_tokenizer",
    "microbatches", "prepare_data", "split_document_ranges", "split_documents", "stdlib_documents", "stdlib_root",
]
