"""Spec -> megatron-core's Adam optimizer config and its learning-rate / weight-decay scheduler."""

from __future__ import annotations

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
