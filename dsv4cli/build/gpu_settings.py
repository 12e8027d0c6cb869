"""Which of megatron's fast paths a run uses, decided from what is installed (CUDA, Transformer Engine, Apex).

One pure function, `gpu_settings(spec, availability, dp, ...) -> GpuSettings`, holds every decision;
`probe()` looks at this machine once. build/config.py takes the TransformerConfig knobs from it,
build/layer_specs.py the module backend and grouped-GEMM experts, train/runtime.py the DDP and
optimizer knobs and the data-feeding flags, the torchrun launch its environment.

What each availability gets (megatron-core 0.16.1; RMSNorm, SwiGLU without biases, non-interleaved RoPE):

| setting | CPU | CUDA, no TE | CUDA + TE |
|---|---|---|---|
| layer modules | local, SDPA attention | local (non-flash attention) | TE (flash attention) |
| `moe_grouped_gemm` (MoE) | no | no | TE >= 1.9 |
| `moe_permute_fusion` (MoE) | no | no | TE >= 2.1 |
| `moe_router_fusion` (MoE: top-k, score function, aux loss) | no | no | TE >= 2.7 |
| `apply_rope_fusion` | no | no | TE >= 1.4 |
| `bias_activation_fusion` (SwiGLU), `bias_dropout_fusion` | no | yes | yes |
| `cross_entropy_loss_fusion` | no | bf16 only (megatron's native kernel returns bf16 gradients) | TE >= 2.0's kernel |
| `masked_softmax_fusion` | no | with Apex's softmax kernels | with Apex's softmax kernels |
| `gradient_accumulation_fusion` | no | with Apex's fused_weight_gradient_mlp_cuda | same (the output layer is megatron's own linear) |
| DDP `overlap_grad_reduce` | no | dp > 1 | dp > 1 |
| DDP/optimizer `overlap_param_gather` | no | with the distributed optimizer | same |
| `CUDA_DEVICE_MAX_CONNECTIONS=1` | no | tp > 1 or cp > 1 | tp > 1 or cp > 1 |
| pinned host batches + background prefetch | no | yes | yes |

Grouped-GEMM experts (megatron's TEGroupedMLP) save under the same checkpoint keys, shapes and expert
offsets as SequentialMLP experts (megatron maps them: `TEGroupedLinear._sharded_state_dict_grouped`),
so a checkpoint moves between CPU and GPU runs; `expert_checkpoint_key` states the mapping.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Optional

TE_INSTALL = ("pip install --no-build-isolation 'transformer_engine[pytorch]>=2.1' "
              "(what this project's [gpu] extra brings: pip install --no-build-isolation -e '.[gpu]')")
_TE_MIN = {"rope_fusion": "1.4", "grouped_gemm": "1.9", "permute_fusion": "2.1", "cross_entropy": "2.0",
           "router_fusion": "2.7"}


@dataclass(frozen=True)
class Availability:
    """What this machine offers. te_version: Transformer Engine's version when it imports (with CUDA)."""

    cuda: bool = False
    te_version: Optional[str] = None
    apex_wgrad: bool = False  # Apex's fused_weight_gradient_mlp_cuda extension
    apex_softmax: bool = False  # Apex's scaled_(upper_triang_)masked_softmax_cuda extensions
    cpu_kernels_missing: Optional[str] = None  # why the compiled CPU mHC kernels cannot run (CPU machines)

    @property
    def te(self) -> bool:
        return self.cuda and self.te_version is not None

    def te_at_least(self, version: str) -> bool:
        return self.te and _version_tuple(self.te_version) >= _version_tuple(version)


@dataclass(frozen=True)
class GpuSettings:
    """The decisions for one run; every dict is keyword arguments of the megatron class it names."""

    availability: Availability
    backend: str  # "te" | "local" (CUDA without TE) | "cpu"
    grouped_gemm: bool
    config: dict  # TransformerConfig
    ddp: dict  # DistributedDataParallelConfig
    optimizer: dict  # OptimizerConfig
    distributed_optimizer: bool
    env: dict  # launch environment of the ranks
    pin_memory: bool  # batches in pinned host memory, copied without blocking
    prefetch: bool  # the next step's batches built in a background thread
    warnings: tuple = field(default_factory=tuple)


def _version_tuple(v: Optional[str]) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v or "0")[:3])


def gpu_settings(spec, avail: Availability, dp: int = 1, virtual_stages: Optional[int] = None) -> GpuSettings:
    """Spec + availability (+ data-parallel size, virtual pipeline stages per rank; default
    parallel.vpp) -> GpuSettings. Pure: no probing, no torch."""
    m, par = spec.model, spec.parallel
    vstages = par.vpp if virtual_stages is None else virtual_stages
    moe = m.moe is not None
    cuda, te = avail.cuda, avail.te
    bf16 = spec.train.precision == "bf16"
    te_ce = avail.te_at_least(_TE_MIN["cross_entropy"])
    mode = spec.train.distributed_optimizer
    dist_opt = mode == "on" or (mode == "auto" and cuda and dp > 1)
    grouped = moe and avail.te_at_least(_TE_MIN["grouped_gemm"])
    config = dict(
        moe_grouped_gemm=grouped,
        moe_permute_fusion=moe and avail.te_at_least(_TE_MIN["permute_fusion"]),
        moe_router_fusion=moe and avail.te_at_least(_TE_MIN["router_fusion"]),
        apply_rope_fusion=avail.te_at_least(_TE_MIN["rope_fusion"]),
        # the SwiGLU clamp runs on megatron's unfused GLU path only (dsv4cli/model/dsv4/experts.py)
        bias_activation_fusion=cuda and not (moe and m.moe.swiglu_limit > 0),
        bias_dropout_fusion=cuda,
        # megatron's native fused cross entropy casts the logits' gradient to bf16: not for fp32 runs
        cross_entropy_loss_fusion=te_ce or (cuda and bf16),
        cross_entropy_fusion_impl="te" if te_ce else "native",
        masked_softmax_fusion=cuda and avail.apex_softmax,
        gradient_accumulation_fusion=cuda and avail.apex_wgrad,
        persist_layer_norm=False,  # an Apex LayerNorm kernel; the model uses RMSNorm
    )
    if not moe:
        del config["moe_grouped_gemm"], config["moe_permute_fusion"], config["moe_router_fusion"]
    if not cuda and vstages > 1:
        # gloo + batched isend/irecv under the interleaved schedule gave silently wrong grads.
        config.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    overlap_grad = cuda and dp > 1
    overlap_param = overlap_grad and dist_opt
    ddp = dict(overlap_grad_reduce=overlap_grad, overlap_param_gather=overlap_param,
               align_param_gather=overlap_param and vstages > 1, use_distributed_optimizer=dist_opt)
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if cuda and (par.tp > 1 or par.cp > 1) else {}
    warnings = []
    if cuda and not te:
        warnings.append(
            "Transformer Engine is not installed: running megatron's local modules, so attention is not flash "
            "attention (memory quadratic in sequence length), MoE experts run one by one (no grouped GEMM) and "
            f"the RoPE / MoE permute / router fusions are off. Install it with: {TE_INSTALL}"
        )
    if not cuda and m.mhc.streams > 1 and avail.cpu_kernels_missing:
        warnings.append(
            f"the compiled CPU mHC kernels are not available ({avail.cpu_kernels_missing}): mHC runs on the slower "
            "PyTorch path (same results). They need a working C compiler (gcc or clang) and a writable cache "
            "directory ($DSV4_CACHE_DIR, default ~/.cache/dsv4); DSV4_NATIVE_KERNELS=0 silences this."
        )
    return GpuSettings(
        availability=avail,
        backend="te" if te else "local" if cuda else "cpu",
        grouped_gemm=grouped,
        config=config,
        ddp=ddp,
        optimizer=dict(overlap_param_gather=overlap_param, use_distributed_optimizer=dist_opt),
        distributed_optimizer=dist_opt,
        env=env,
        pin_memory=cuda,
        prefetch=cuda,
        warnings=tuple(warnings),
    )


def export_launch_env(spec, avail: Optional[Availability] = None) -> dict:
    """Put the environment the torchrun ranks of `spec` need on this machine into os.environ (which
    torchrun and its ranks inherit); a value the user set already is kept. -> what it set."""
    import os

    env = {k: v for k, v in gpu_settings(spec, avail or probe()).env.items() if k not in os.environ}
    os.environ.update(env)
    return env


@functools.lru_cache(maxsize=1)
def probe() -> Availability:
    """This machine's Availability (imports torch; TE only with CUDA). Cached."""
    import importlib.util

    from dsv4cli.compat import device

    if device.on_cpu():
        from dsv4cli.kernels import native_build  # builds the CPU kernels now (first use), not in step 1

        return Availability(cpu_kernels_missing=native_build.unavailable_reason())
    te_version = None
    try:
        import transformer_engine
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # noqa: F401

        te_version = getattr(transformer_engine, "__version__", None) or _dist_version("transformer_engine")
    except Exception:  # ImportError, or a TE build that does not load on this machine
        te_version = None

    def has(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return Availability(cuda=True, te_version=te_version, apex_wgrad=has("fused_weight_gradient_mlp_cuda"),
                        apex_softmax=has("scaled_masked_softmax_cuda") and has("scaled_upper_triang_masked_softmax_cuda"))


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "0"


# --------------------------------------------------------------------------- expert checkpoint keys

_SEQUENTIAL = re.compile(r"^(?P<pre>.*\.experts\.)local_experts\.(?P<e>\d+)\.(?P<lin>linear_fc[12])\.(?P<p>weight|bias)$")
_GROUPED = re.compile(r"^(?P<pre>.*\.experts\.)(?P<lin>linear_fc[12])\.(?P<p>weight|bias)(?P<e>\d+)$")


def expert_checkpoint_key(module_key: str, num_local_experts: int, ep_rank: int = 0) -> Optional[tuple[str, int]]:
    """A module state-dict key of an expert weight, either layout -> (checkpoint key, global expert index).

    SequentialMLP: `decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc1.weight`; TEGroupedMLP:
    `decoder.layers.{L}.mlp.experts.linear_fc1.weight{e}`. Megatron saves both as
    `decoder.layers.mlp.experts.experts.linear_fc1.weight` (decoder layers stacked on a leading axis,
    MTP layers keep their index) at expert offset ep_rank * num_local_experts + e. None for other keys.
    """
    match = _SEQUENTIAL.match(module_key) or _GROUPED.match(module_key)
    if match is None:
        return None
    pre = re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.", match["pre"])
    return f"{pre}experts.{match['lin']}.{match['p']}", ep_rank * num_local_experts + int(match["e"])
