"""GPU settings chosen by what is installed (dsv4cli/build/gpu_settings.py), under simulated availability.

No GPU here: `Availability` is given explicitly (or `probe` monkeypatched) and the tests check which
fusions, grouped GEMM and overlap flags reach megatron's TransformerConfig, DDP config and optimizer
config, that the CPU settings are the ones CPU runs always had, and the expert checkpoint-key mapping
against megatron's own SequentialMLP.
"""

from __future__ import annotations

import os

import pytest

from dsv4cli.build.gpu_settings import Availability, expert_checkpoint_key, gpu_settings

CPU = Availability()
CUDA = Availability(cuda=True)
CUDA_APEX = Availability(cuda=True, apex_wgrad=True, apex_softmax=True)
CUDA_TE = Availability(cuda=True, te_version="2.8.0+40c69e75")
OLD_TE = Availability(cuda=True, te_version="1.5.0")
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion", "apply_rope_fusion",
           "masked_softmax_fusion", "gradient_accumulation_fusion", "persist_layer_norm")
MOE = {"model.moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16}}


def test_cpu_gets_no_fusion_no_overlap_no_env(tiny_spec):
    s = gpu_settings(tiny_spec(**MOE), CPU, dp=2)
    assert s.backend == "cpu" and not s.grouped_gemm and not s.warnings and s.env == {}
    assert all(s.config[f] is False for f in FUSIONS)
    assert s.config["moe_grouped_gemm"] is False and s.config["moe_permute_fusion"] is False
    assert s.config["moe_router_fusion"] is False
    assert not s.ddp["overlap_grad_reduce"] and not s.ddp["overlap_param_gather"]
    assert not s.distributed_optimizer and not s.pin_memory and not s.prefetch
    assert "overlap_p2p_comm" not in s.config
    vpp = gpu_settings(tiny_spec(), CPU, virtual_stages=2).config
    assert vpp["overlap_p2p_comm"] is True and vpp["batch_p2p_comm"] is False  # gloo + VPP workaround


def test_cuda_with_te_gets_grouped_gemm_and_every_fusion(tiny_spec):
    s = gpu_settings(tiny_spec(**MOE, **{"parallel.tp": 2}), CUDA_TE, dp=4)
    assert s.backend == "te" and s.grouped_gemm and not s.warnings
    c = s.config
    assert c["moe_grouped_gemm"] and c["moe_permute_fusion"] and c["moe_router_fusion"] and c["apply_rope_fusion"]
    assert c["bias_activation_fusion"] and c["bias_dropout_fusion"] and c["cross_entropy_loss_fusion"]
    assert c["cross_entropy_fusion_impl"] == "te"
    # Apex kernels are separate: without them no softmax / gradient-accumulation fusion
    assert not c["masked_softmax_fusion"] and not c["gradient_accumulation_fusion"]
    assert s.ddp["overlap_grad_reduce"] and s.ddp["overlap_param_gather"] and s.distributed_optimizer
    assert s.optimizer == {"overlap_param_gather": True, "use_distributed_optimizer": True}
    assert s.env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} and s.pin_memory and s.prefetch
    dense = gpu_settings(tiny_spec(), CUDA_TE).config
    assert "moe_grouped_gemm" not in dense and dense["apply_rope_fusion"]


def test_old_te_and_apex_and_overlap_edges(tiny_spec):
    old = gpu_settings(tiny_spec(**MOE), OLD_TE)
    assert old.backend == "te" and not old.grouped_gemm and old.config["apply_rope_fusion"]
    assert not old.config["moe_permute_fusion"] and not old.config["moe_router_fusion"]
    apex = gpu_settings(tiny_spec(), CUDA_APEX).config
    assert apex["masked_softmax_fusion"] and apex["gradient_accumulation_fusion"]
    # megatron's native fused cross entropy returns bf16 gradients: only for bf16 runs without TE
    assert not apex["cross_entropy_loss_fusion"]
    bf16 = gpu_settings(tiny_spec(**{"train.precision": "bf16"}), CUDA).config
    assert bf16["cross_entropy_loss_fusion"] and bf16["cross_entropy_fusion_impl"] == "native"
    one = gpu_settings(tiny_spec(), CUDA_TE, dp=1)  # nothing to reduce, nothing to overlap
    assert not one.ddp["overlap_grad_reduce"] and not one.distributed_optimizer and one.env == {}
    off = gpu_settings(tiny_spec(**{"train.distributed_optimizer": "off"}), CUDA_TE, dp=2)
    assert off.ddp["overlap_grad_reduce"] and not off.ddp["overlap_param_gather"]
    vpp = gpu_settings(tiny_spec(), CUDA_TE, dp=2, virtual_stages=2)
    assert vpp.ddp["align_param_gather"] and "overlap_p2p_comm" not in vpp.config
    assert gpu_settings(tiny_spec(**{"parallel.cp": 2}), CUDA, dp=1).env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    on_cpu = gpu_settings(tiny_spec(**{"train.distributed_optimizer": "on"}), CPU, dp=2)
    assert on_cpu.distributed_optimizer and not on_cpu.ddp["overlap_param_gather"]


def test_cuda_without_te_warns_with_the_install_command(tiny_spec, capsys):
    from dsv4cli.train.runtime import _announce

    s = gpu_settings(tiny_spec(**MOE), CUDA, dp=2)
    assert s.backend == "local" and not s.grouped_gemm and not s.config["apply_rope_fusion"]
    assert s.config["bias_activation_fusion"] and s.ddp["overlap_grad_reduce"]
    (w,) = s.warnings
    for words in ("Transformer Engine is not installed", "flash attention", "quadratic in sequence length",
                  "grouped GEMM", "pip install", "transformer_engine[pytorch]", "[gpu]"):
        assert words in w
    _announce(s)
    assert capsys.readouterr().err.strip() == f"warning: {w}"


def test_cpu_without_the_compiled_mhc_kernels_warns_only_where_mhc_runs(tiny_spec):
    missing = Availability(cpu_kernels_missing="no C compiler found (set CC, or install gcc / clang)")
    (w,) = gpu_settings(tiny_spec(), missing).warnings  # tiny: 4 streams
    for words in ("compiled CPU mHC kernels are not available", "no C compiler found", "slower PyTorch path",
                  "DSV4_NATIVE_KERNELS=0"):
        assert words in w
    assert not gpu_settings(tiny_spec(**{"model.mhc.streams": 1}), missing).warnings
    assert not gpu_settings(tiny_spec(), CPU).warnings


def test_probe_on_cpu_builds_the_kernels_and_reports_a_failed_build(monkeypatch, tmp_path):
    from dsv4cli.build.gpu_settings import probe
    from dsv4cli.kernels import native_build

    probe.cache_clear()
    native_build.library.cache_clear()
    try:
        assert probe().cpu_kernels_missing is None  # this machine has a C compiler (the test setup needs one)
        probe.cache_clear()
        native_build.library.cache_clear()
        monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", "false")
        assert "false failed" in probe().cpu_kernels_missing
        probe.cache_clear()
        monkeypatch.setenv("DSV4_NATIVE_KERNELS", "0")
        assert probe().cpu_kernels_missing is None  # switched off on purpose: nothing to warn about
    finally:
        probe.cache_clear()
        native_build.library.cache_clear()


def _recorded_transformer_config(monkeypatch, spec, avail):
    """transformer_config(spec) with probe() -> avail; -> the kwargs that reached the config class."""
    from dsv4cli.build import config, gpu_settings as gs
    from dsv4cli.model import config as model_config

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(gs, "probe", lambda: avail)
    monkeypatch.setattr(model_config, "Dsv4TransformerConfig", Recorder)
    config.transformer_config(spec)
    return seen


@pytest.mark.parametrize("avail", [CUDA_TE, CUDA_APEX, CPU], ids=["cuda+te", "cuda+apex", "cpu"])
def test_settings_reach_transformer_config(monkeypatch, tiny_spec, avail):
    spec = tiny_spec(**MOE)
    seen = _recorded_transformer_config(monkeypatch, spec, avail)
    want = gpu_settings(spec, avail).config
    assert {k: seen[k] for k in want} == want
    assert seen["moe_grouped_gemm"] is (avail is CUDA_TE)


def test_cuda_without_te_settings_pass_megatrons_own_checks(monkeypatch, tiny_spec):
    """The fusions chosen without TE are valid for this model: megatron's TransformerConfig accepts them."""
    from dsv4cli.build import config, gpu_settings as gs

    monkeypatch.setattr(gs, "probe", lambda: CUDA_APEX)
    cfg = config.transformer_config(tiny_spec(**MOE))
    assert cfg.bias_activation_fusion and cfg.bias_dropout_fusion and not cfg.cross_entropy_loss_fusion
    assert cfg.masked_softmax_fusion and cfg.gradient_accumulation_fusion and not cfg.moe_grouped_gemm


def test_cpu_transformer_config_is_unchanged(tiny_spec):
    """On CPU the config is what it was before gpu_settings (every fusion off, SequentialMLP experts)."""
    from dsv4cli.build.config import transformer_config

    cfg = transformer_config(tiny_spec(**MOE))
    assert not any(getattr(cfg, f) for f in FUSIONS)
    assert not cfg.moe_grouped_gemm and not cfg.moe_permute_fusion and cfg.use_cpu_initialization


def test_settings_reach_ddp_and_optimizer_configs(monkeypatch, megatron_1proc, tiny_spec):
    """build_runtime passes the overlap flags to megatron's DDP and optimizer configs and sets the
    schedule's grad-sync hook (here CUDA + TE with dp = 2 simulated on one CPU process)."""
    from dsv4cli.spec.layout import ParallelDims
    from dsv4cli.train import runtime

    simulated = gpu_settings(tiny_spec(), CUDA_TE, dp=2)
    monkeypatch.setattr(runtime, "run_settings", lambda spec, layout: simulated)
    monkeypatch.setattr(runtime, "initialize_parallel", lambda spec: ParallelDims.of(spec, 1))
    rt = runtime.build_runtime(tiny_spec(**{"model.mhc.streams": 1, "model.mtp.depth": 0}))
    ddp = rt.model[0].ddp_config
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.use_distributed_optimizer
    assert rt.optimizer.config.overlap_param_gather and rt.optimizer.config.use_distributed_optimizer
    assert rt.config.grad_sync_func == rt.model[0].start_grad_sync
    with runtime.params_synced(rt):  # hooks paused (params gathered), then back
        assert not rt.model[0].remove_forward_pre_hook_handles
    assert rt.model[0].remove_forward_pre_hook_handles


def test_expert_key_mapping_matches_megatrons_sequential_mlp(megatron_1proc, tiny_spec):
    """Both expert layouts map onto the checkpoint keys and expert offsets megatron's SequentialMLP saves
    (TEGroupedMLP's own sharded_state_dict needs TE: benchmarks/gpu_check.py compares the two on a GPU)."""
    from dsv4cli.build import build_model

    key = "decoder.layers.5.mlp.experts.experts.linear_fc2.weight".replace("layers.5.", "layers.")
    assert expert_checkpoint_key("decoder.layers.5.mlp.experts.local_experts.3.linear_fc2.weight", 4, ep_rank=1) == (
        key, 7)
    assert expert_checkpoint_key("decoder.layers.5.mlp.experts.linear_fc2.weight3", 4, ep_rank=1) == (key, 7)
    assert expert_checkpoint_key("decoder.layers.0.mlp.router.weight", 4) is None
    model = build_model(tiny_spec(**MOE, **{"model.mhc.streams": 1, "model.mtp.depth": 1}))
    sharded = model.sharded_state_dict()
    experts = [k for k in model.state_dict() if ".local_experts." in k and not k.endswith("_extra_state")]
    assert len(experts) == 3 * 4 * 2  # (2 layers + 1 MTP layer) x experts x (fc1, fc2)
    for key in experts:
        ckpt_key, e = expert_checkpoint_key(key, num_local_experts=4)
        grouped = key.replace(f"local_experts.{e}.", "") + str(e)  # TEGroupedMLP's name of the same weight
        assert expert_checkpoint_key(grouped, 4) == (ckpt_key, e)
        assert sharded[key].key == ckpt_key
        if key.endswith("linear_fc2.weight"):  # fc1 is a SwiGLU factory (split at load), fc2 a plain tensor
            axis = 1 if key.startswith("decoder.") else 0  # after the stacked-layer axis
            assert sharded[key].global_offset[axis] == e and sharded[key].global_shape[axis] == 4


def test_launch_env_is_exported_for_torchrun_only_on_cuda(monkeypatch, tiny_spec):
    from dsv4cli.build.gpu_settings import export_launch_env

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    spec = tiny_spec(**{"parallel.tp": 2})
    assert export_launch_env(spec, CPU) == {} and "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    assert export_launch_env(spec, CUDA_TE) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4")  # the user's own value wins
    assert export_launch_env(spec, CUDA_TE) == {} and os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "4"


@pytest.mark.slow
def test_fusions_chosen_on_cuda_run_this_model_and_compute_the_same(tiny_spec, cpu_compat):
    """The fusions gpu_settings turns on with CUDA for an fp32 run (bias-SwiGLU, bias-dropout-add:
    torch.compile'd code that also runs on CPU) give this model's loss and gradients (MoE experts,
    n = 4 streams, MTP). (Megatron's native fused cross entropy is left to bf16 runs: it returns
    bf16 logit gradients, about 2e-3 off in fp32.)"""
    import dataclasses

    import torch

    from dsv4cli.build import single_process, transformer_config
    from dsv4cli.build.model import build_model_from_config

    spec = tiny_spec(**MOE)
    fused_keys = {k for k, v in gpu_settings(spec, CUDA).config.items() if v is True}
    assert fused_keys == {"bias_activation_fusion", "bias_dropout_fusion"}
    out = {}
    with single_process(spec, seed=0):
        cfg = transformer_config(spec)
        for fused in (False, True):
            torch.manual_seed(0)
            model = build_model_from_config(spec, dataclasses.replace(cfg, **{k: fused for k in fused_keys}))
            ids = torch.randint(0, 256, (2, 16))
            loss = model(ids, torch.arange(16).expand(2, 16), attention_mask=None, labels=ids,
                         loss_mask=torch.ones(2, 16))
            loss.mean().backward()
            out[fused] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
    assert len(out[True][1]) == len(out[False][1]) > 0
    # fp32 rounding of the fused kernels, relative to the largest gradient (some mHC gradients are near 0)
    scale = max(b.abs().max() for b in out[False][1])
    for a, b in zip(out[True][1], out[False][1]):
        assert (a - b).abs().max() <= 1e-6 * scale


def test_slurm_script_exports_the_gpu_launch_env(tmp_path):
    """sbatch scripts run on CUDA nodes: CUDA_DEVICE_MAX_CONNECTIONS=1 where tp > 1 (a user's value kept)."""
    from dsv4cli.train.launch import plan_launch, slurm_script

    spec = os.path.join(os.path.dirname(__file__), "..", "specs", "tiny.toml")
    line = 'export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"'
    tp2 = plan_launch(spec, ["parallel.tp=2", "launch.nproc_per_node=2"])
    assert not tp2.problems, tp2.problems
    assert line in slurm_script(tp2).splitlines()
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in slurm_script(plan_launch(spec, []))


@pytest.mark.parametrize("avail", [CUDA_TE, CUDA_APEX], ids=["cuda+te", "cuda+apex"])
def test_swiglu_clamp_keeps_the_unfused_activation_on_cuda(monkeypatch, tiny_spec, avail):
    """The fused SwiGLU kernels skip the clamp: a clamped spec gets no bias_activation_fusion, and the
    config it builds passes the DSv4 MoE layer's own check; the same spec unclamped keeps the fusion."""
    from dsv4cli.build import config, gpu_settings as gs
    from dsv4cli.model.dsv4.experts import check_clamped_swiglu

    clamped = {"model.moe": {**MOE["model.moe"], "score_function": "sqrtsoftplus", "swiglu_limit": 7.0}}
    assert gpu_settings(tiny_spec(**MOE), avail).config["bias_activation_fusion"]
    assert not gpu_settings(tiny_spec(**clamped), avail).config["bias_activation_fusion"]
    if avail is CUDA_TE:
        return  # megatron's TransformerConfig checks that TE is really installed
    monkeypatch.setattr(gs, "probe", lambda: avail)
    cfg = config.transformer_config(tiny_spec(**clamped))
    assert cfg.activation_func_clamp_value == 7.0 and not cfg.bias_activation_fusion
    check_clamped_swiglu(cfg)  # would raise for a fused activation
