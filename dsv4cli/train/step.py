"""One training step (forward/backward over the micro-batches, optimizer and scheduler step, expert
bias, the step's reduced values) and the parts of the model it touches, collected once.

The indexer's dense warm-up (`model.attention.indexer_warmup_steps`, with `indexer_loss_weight` > 0):
iterations below it attend densely and change the lightning indexer's parameters only: every other
parameter, its Adam moments and the routers' expert biases stay bit-identical
(dsv4cli.build.optimizer.indexer_only_step). The iteration decides alone, so a resume in the middle
of the warm-up is exact; the learning-rate schedule and the step counters run as without it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

from dsv4cli.train.runtime import Runtime, StepValues, reduce_step_values, run_microbatches


@dataclass
class ModelParts:
    """What a training step touches inside the model, walked once after the model is built."""

    attention: list = field(repr=False)  # every DeepSeek-V4 attention module (warm-up iteration, indexer losses)
    routers: list = field(repr=False)  # this rank's routers with an expert bias (may be none)
    expert_bias: bool  # the model has biased routers (on some stage): every rank joins their update
    indexer_loss: bool  # the spec trains the indexer: its loss is reduced and logged
    freeze_steps: int = 0  # iterations below it change only the indexer
    frozen: list = field(default_factory=list, repr=False)  # all parameters but the indexer's

    @classmethod
    def collect(cls, rt: Runtime) -> "ModelParts":
        from dsv4cli.build.optimizer import indexer_warmup_freeze_steps, trains_indexer
        from dsv4cli.model.dsv4.expert_bias import biased_routers, has_expert_bias
        from dsv4cli.model.dsv4.indexer_loss import attention_modules, indexer_parameters

        attention = attention_modules(rt.chunks)
        expert_bias = has_expert_bias(rt.config)
        parts = cls(attention=attention, routers=biased_routers(rt.chunks) if expert_bias else [],
                    expert_bias=expert_bias, indexer_loss=trains_indexer(rt.spec),
                    freeze_steps=indexer_warmup_freeze_steps(rt.spec))
        if parts.freeze_steps:
            indexer = {id(p) for p in indexer_parameters(attention)}
            parts.frozen = [p for c in rt.chunks for p in c.parameters() if p.requires_grad and id(p) not in indexer]
        return parts

    def only_indexer_trains(self, iteration: int) -> bool:
        return iteration < self.freeze_steps


@dataclass
class StepResult:
    values: StepValues  # loss, MTP losses, stop, indexer loss (reduced over the ranks)
    ok: bool  # the optimizer stepped (False: fp16 overflow, skipped)
    grad_norm: Optional[float]
    moe_loads: Optional[list[float]]  # max/mean load per biased layer (None: no expert bias)


def train_step(rt: Runtime, parts: ModelParts, batches: list[dict], iteration: int, stop: bool = False) -> StepResult:
    """Run training iteration `iteration` (0-based) on this rank's micro-batches; every rank calls it."""
    from dsv4cli.build.optimizer import indexer_only_step
    from dsv4cli.model.dsv4.expert_bias import update_expert_bias
    from dsv4cli.model.dsv4.indexer_loss import set_iteration, take_indexer_losses

    for m in rt.model:
        m.zero_grad_buffer()
    rt.optimizer.zero_grad()
    set_iteration(parts.attention, iteration)  # the indexer's dense warm-up follows it
    losses = run_microbatches(rt, batches, forward_only=False)
    warmup = parts.only_indexer_trains(iteration)
    with indexer_only_step(rt.optimizer, parts.frozen) if warmup else nullcontext():
        ok, grad_norm, _ = rt.optimizer.step()
    if ok:
        rt.scheduler.step(increment=1)
    moe_loads = update_expert_bias(parts.routers, rt.config, frozen=warmup) if parts.expert_bias else None
    indexer = take_indexer_losses(parts.attention) if parts.indexer_loss else None
    values = reduce_step_values(rt, losses, len(batches), stop, indexer=indexer)
    return StepResult(values, bool(ok), float(grad_norm) if grad_norm is not None else None, moe_loads)
