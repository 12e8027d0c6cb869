"""Spec -> megatron-core's Adam optimizer config and its learning-rate / weight-decay scheduler."""

from __future__ import annotations

from contextlib import contextmanager

from dsv4cli.spec.schema import Spec

# train.* keys that megatron's OptimizerConfig takes under the same name.
ADAM_KEYS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")


def optimizer_config(spec: Spec, bf16: bool, settings: dict):
    """OptimizerConfig: Adam with the spec's train.* hyper-parameters (ADAM_KEYS), bf16 params with
    fp32 main weights when `bf16`, and this machine's overlap/distributed flags (`settings`:
    GpuSettings.optimizer)."""
    import torch
    from megatron.core.optimizer import OptimizerConfig

    hyper = {k: getattr(spec.train, k) for k in ADAM_KEYS}
    dtype = torch.bfloat16 if bf16 else torch.float32
    return OptimizerConfig(optimizer="adam", bf16=bf16, params_dtype=dtype, **hyper, **settings)


def param_scheduler(spec: Spec, optimizer):
    """OptimizerParamScheduler: linear warm-up from 0 over train.warmup_steps (at most steps - 1),
    cosine decay to train.min_lr at train.steps, constant weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = spec.train
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(t.steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


# --------------------------------------------------------------------------- the indexer's dense warm-up

# The value of `lr_mult` that tags the lightning indexer's optimizer param groups. megatron-core
# 0.16-0.19 pair a checkpoint's param groups with the run's by (wd_mult, lr_mult, is_expert_parallel,
# is_decoupled_lr) (dsv4cli.compat.versions) and their scheduler no longer reads `lr_mult` (it sets
# every group's lr from max_lr / min_lr), so a distinct lr_mult keeps the indexer's groups apart on
# resume and changes no number; a string rather than a number so that a megatron that multiplied
# by it again would fail loudly instead of training at another rate.
INDEXER_GROUP_TAG = "indexer"


def trains_indexer(spec: Spec) -> bool:
    """The spec gives a lightning indexer a loss (a csa layer, `indexer_loss_weight` > 0)."""
    a = spec.model.attention
    return a is not None and a.indexer_loss_weight > 0 and "csa" in a.layer_types


def indexer_warmup_freeze_steps(spec: Spec) -> int:
    """Iterations at the start of training in which only the lightning indexer trains: the dense
    warm-up (`model.attention.indexer_warmup_steps`) of a spec that trains the indexer; 0 otherwise
    (with `indexer_loss_weight` 0 the whole model trains on the LM loss during a dense warm-up)."""
    return spec.model.attention.indexer_warmup_steps if trains_indexer(spec) else 0


def param_group_overrides(spec: Spec, config, chunks: list):
    """megatron's `config_overrides` for get_megatron_optimizer(config, DDP(chunks)): None (megatron's
    standard groups, as without a warm-up) unless the spec freezes all but the indexer during a
    warm-up; then the standard overrides plus the indexer's parameters in groups of their own,
    tagged `lr_mult = INDEXER_GROUP_TAG`."""
    if not indexer_warmup_freeze_steps(spec):
        return None
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate, get_standard_config_overrides

    from dsv4cli.model.dsv4.indexer_loss import attention_modules, indexer_parameters

    ids = {id(p) for p in indexer_parameters(attention_modules(chunks))}
    indexer = ParamWithNamePredicate(name="dsv4_indexer", fn=lambda param, name: id(param) in ids)
    tagged = {ParamKey(with_name_predicate=indexer): {"lr_mult": INDEXER_GROUP_TAG}}
    return {**get_standard_config_overrides(config), **tagged}


def is_indexer_group(group: dict) -> bool:
    return group.get("lr_mult") == INDEXER_GROUP_TAG


@contextmanager
def indexer_only_step(optimizer, frozen_params: list):
    """Inside: an optimizer step leaves `frozen_params` (every parameter but the indexer's) and their
    Adam moments bit-identical. Their gradients are zeroed (after the data-parallel reduction,
    before the step: out of the gradient norm and clipping) and their groups' learning rate is 0, so
    AdamW's decoupled weight decay (p *= 1 - lr * wd) and update (p -= lr * m / (sqrt(v) + eps)) are
    exact no-ops, and moments that are zero (a warm-up from the start) stay zero. Every parameter
    still takes the step, so megatron's single Adam step count (the distributed optimizer checks it)
    stays one count. The learning rates are put back on leaving (the scheduler's values)."""
    import torch

    grads = [p.main_grad for p in frozen_params if getattr(p, "main_grad", None) is not None]
    if grads:
        torch._foreach_zero_(grads)
    frozen = [g for g in optimizer.param_groups if not is_indexer_group(g)]
    saved = [float(g["lr"]) for g in frozen]
    for g in frozen:
        _set_lr(g, 0.0)
    try:
        yield
    finally:
        for g, lr in zip(frozen, saved):
            _set_lr(g, lr)


def _set_lr(group: dict, lr: float) -> None:
    """A group's lr is a float, or a tensor (megatron-core 0.19 with a capturable optimizer: fill it)."""
    import torch

    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr
