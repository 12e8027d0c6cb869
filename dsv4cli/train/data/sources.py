"""The data a spec's run reads: its train and held-out SampleSources, and the cheap pre-flight check."""

from __future__ import annotations

from dataclasses import dataclass

from dsv4cli.train.data.builtin import BuiltinCorpus
from dsv4cli.train.data.indexed import megatron_sources
from dsv4cli.train.data.splits import check_splits
from dsv4cli.train.data.tokenizers import make_tokenizer


@dataclass
class DataSources:
    train: object
    valid: object
    tokenizer: object


def sample_counts(spec) -> tuple[int, int]:
    """(training samples, held-out samples) a run draws from the data sets."""
    t = spec.train
    return t.steps * t.global_batch_size, t.eval_batches * t.global_batch_size


def check_data(spec) -> None:
    """The data settings a run will use, checked without building a dataset (cheap; no process
    group): tokenizer against the model, data files present, no empty split. Raises DataError."""
    make_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    check_splits(spec, *sample_counts(spec))


def build_sources(spec) -> DataSources:
    """Train and held-out SampleSources for a spec (sizes from train.steps and eval settings)."""
    tok = make_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    if spec.data.source == "builtin":
        args = (tok, spec.model.seq_length, spec.data.valid_fraction, spec.train.seed)
        return DataSources(BuiltinCorpus("train", *args), BuiltinCorpus("valid", *args), tok)
    train, valid = megatron_sources(spec, tok, *sample_counts(spec))
    return DataSources(train, valid, tok)
