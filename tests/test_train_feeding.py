"""Batch feeding (dsv4cli/train/feeding.py): what each rank reads, the TP broadcast, the read-ahead."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest


class CountingSource:
    """A deterministic SampleSource that counts which samples were read (and from which threads)."""

    def __init__(self, seq: int = 8):
        self.seq, self.reads, self.threads = seq, [], set()

    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        self.reads.append(i)
        self.threads.add(threading.current_thread().name)
        w = (np.arange(self.seq + 1, dtype=np.int64) * 7 + i) % 251
        return w[:-1], w[1:], ((np.arange(self.seq) + i) % 3 != 0).astype(np.float32)


def _rt(dp: int = 1, gbs: int = 4, mbs: int = 2, seq: int = 8):
    spec = SimpleNamespace(train=SimpleNamespace(global_batch_size=gbs, micro_batch_size=mbs),
                           model=SimpleNamespace(seq_length=seq))
    return SimpleNamespace(spec=spec, dims=SimpleNamespace(dp=dp), settings=None)


def _same(batches, expected):
    import torch

    assert len(batches) == len(expected)
    for b, e in zip(batches, expected):
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(b[k], torch.from_numpy(e[k])), k


def test_one_process_feeds_what_microbatches_builds(megatron_1proc):
    from dsv4cli.train.data import microbatches
    from dsv4cli.train.feeding import BatchFeeder

    src = CountingSource()
    feeder = BatchFeeder(_rt(), src)
    assert feeder.plan.needs and feeder.plan.reads and not feeder.plan.prefetch  # CPU: no read-ahead
    for pos in (0, 4, 12):
        _same(feeder.get(pos), microbatches(CountingSource(), pos, 4, 2, 0, 1))
    assert src.reads == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15] and src.threads == {threading.current_thread().name}
    feeder.close()


def test_read_ahead_reads_the_next_step_in_the_background(megatron_1proc):
    from dsv4cli.train.data import microbatches
    from dsv4cli.train.feeding import BatchFeeder

    src = CountingSource()
    feeder = BatchFeeder(_rt(), src)
    feeder.plan = dataclasses.replace(feeder.plan, prefetch=True)  # as on CUDA (pinning needs CUDA)
    feeder._pool = ThreadPoolExecutor(1, thread_name_prefix="dsv4-prefetch")
    _same(feeder.get(0), microbatches(CountingSource(), 0, 4, 2, 0, 1))
    feeder._ahead[1].result()
    assert src.reads == [0, 1, 2, 3, 4, 5, 6, 7]  # step 2's samples were read ahead
    _same(feeder.get(4), microbatches(CountingSource(), 4, 4, 2, 0, 1))  # ... and used, not read again
    feeder._ahead[1].result()
    assert src.reads == list(range(12))  # 4..7 once; 8..11 read ahead for the step after
    _same(feeder.get(40), microbatches(CountingSource(), 40, 4, 2, 0, 1))  # an unexpected position: read now
    feeder.close()
    assert src.reads[12:16] == [40, 41, 42, 43] and src.reads.count(8) == 1
    assert any(t.startswith("dsv4-prefetch") for t in src.threads)


def test_middle_pipeline_stages_get_placeholders():
    from dsv4cli.train.feeding import FeedPlan, deliver

    plan = FeedPlan(needs=False, reads=False, tp_group=None, tp_src=0, tp_size=1, dp_rank=0, dp=1, device=None,
                    pin=False, prefetch=False)
    out = deliver(plan, None, num_micro=3, micro_batch=2, seq=8)
    assert len(out) == 3 and all(v is None for b in out for v in b.values())


def worker(args: dict) -> dict:
    """Per-rank body (tests/distributed.py): TP = 2; only TP rank 0 reads, both get the same batches."""
    import torch
    from megatron.core import parallel_state as ps

    from dsv4cli.build.parallel import init_process_group
    from dsv4cli.compat import activate
    from dsv4cli.train.feeding import BatchFeeder

    activate()
    init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    src = CountingSource()
    feeder = BatchFeeder(_rt(), src)
    batches = [feeder.get(p) for p in (0, 4)]
    flat = torch.cat([torch.cat([b["tokens"].flatten(), b["labels"].flatten(), b["loss_mask"].flatten().long()])
                      for step in batches for b in step])
    return {"reads": len(src.reads), "flat": flat.tolist(), "tp_rank": ps.get_tensor_model_parallel_rank()}


@pytest.mark.slow
def test_tp2_only_rank_0_reads_and_both_get_the_same_batches():
    from distributed import run_distributed

    from dsv4cli.train.data import microbatches

    r0, r1 = sorted(run_distributed("test_train_feeding:worker", {}), key=lambda r: r["tp_rank"])
    assert r0["reads"] == 8 and r1["reads"] == 0
    assert r0["flat"] == r1["flat"]
    want = [v for p in (0, 4) for m in microbatches(CountingSource(), p, 4, 2, 0, 1)
            for v in [*m["tokens"].ravel(), *m["labels"].ravel(), *m["loss_mask"].astype(np.int64).ravel()]]
    assert r0["flat"] == [int(v) for v in want]
