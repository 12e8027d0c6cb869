"""megatron-core GPT datasets (an indexed blend, or mock data) as SampleSources."""

from __future__ import annotations

import numpy as np

from dsv4cli.train.data.splits import check_splits, indexed_blend, split_vector, valid_percent

_CAUSAL_LM_SAMPLES = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                          create_attention_mask=False)
"""GPTDatasetConfig flags of the samples the loop expects: positions 0..s-1 in every sample, the
loss on every token (eod included), and no attention-mask tensor (the attention is causal)."""


class MegatronSource:
    """SampleSource over a megatron-core GPTDataset (indexed blend or mock)."""

    def __init__(self, dataset):
        self.ds = dataset

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        """-> (tokens [s], labels [s], loss_mask [s]): int64, int64, float32."""
        item = self.ds[i % len(self.ds)]
        return (
            np.asarray(item["tokens"], dtype=np.int64),
            np.asarray(item["labels"], dtype=np.int64),
            np.asarray(item["loss_mask"], dtype=np.float32),
        )


def megatron_sources(spec, tokenizer, num_train: int, num_valid: int) -> tuple[MegatronSource, MegatronSource]:
    """(train, valid) sources of `num_train` / `num_valid` samples: data.paths, or mock data without them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = indexed_blend(spec)
    check_splits(spec, num_train, num_valid)
    split = split_vector(valid_percent(spec.data.valid_fraction))
    config = GPTDatasetConfig(random_seed=spec.train.seed, sequence_length=spec.model.seq_length, blend=blend,
                              split=split, tokenizer=tokenizer, **_CAUSAL_LM_SAMPLES)
    cls = MockGPTDataset if blend is None else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, [num_train, num_valid, 0], lambda: True, config).build()
    return MegatronSource(train), MegatronSource(valid)
