"""Every Triton kernel compiles for a real GPU target (sm_90 cubin via Triton's bundled ptxas), no GPU needed.

The interpreter (tests/test_kernels_triton.py) checks the numbers but accepts programs the GPU compiler
rejects (loop-carried type changes, dot shapes, layouts); this compiles the kernels ahead of time in a
subprocess without TRITON_INTERPRET so they are real JIT functions. Default suite: the small kernels and
`_contract_fwd_row` / `_contract_bwd_row` at n = 4, h = 7168, bf16; slow: every kernel, n in {1, 4, 8}, bf16 and fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    r'''
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsv4cli.kernels import triton_ops
    from dsv4cli.kernels.triton_ops import launch as K

    assert not K.INTERPRETED
    names, acts, ns, shapes = json.loads(sys.argv[1])
    F = "*fp32"
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")

    def specs(act, n, T, h):
        """(kernel, signature, meta) exactly as the launchers in triton_ops choose them."""
        eb = 2 if act in ("*bf16", "*fp16") else 4
        M, NP = n * n + 2 * n, triton.next_power_of_2(n)
        coef = dict(n=n, BT=K.coef_block(T, n), NP=NP)
        bt, np_, bh = K.stream_blocks(T, n, h)
        stream = dict(n=n, BT=bt, NP=np_, BH=bh)
        yield "_proj_sumsq_fwd", dict(x_ptr=act, w_ptr=F, mix_ptr=F, rstd_ptr=F, T="i32", K="i32", M="i32", eps="fp32"), K.proj_fwd_meta(T, n * h, M, eb)
        for comb, m, has_dx in ((False, M, True), (True, n, True), (False, n, False)):
            yield "_proj_bwd", dict(x_ptr=act, w_ptr=F, dmix_ptr=F, xcoef_ptr=F, pre_ptr=F, dy_ptr=act, dx_ptr=act, dw_ptr=F, T="i32", K="i32", M="i32", h="i32", n="i32", tokens_per_split="i32"), dict(HAS_COMBINE=comb, HAS_DX=has_dx, **K.proj_bwd_meta(T, n * h, m, eb))
        yield "_mhc_coef_fwd", dict(mix_ptr=F, rstd_ptr=F, alpha_ptr=F, bias_ptr=F, pre_ptr=F, post_ptr=F, res_ptr=F, T="i32", iterations="i32", eps="fp32"), coef
        yield "_mhc_coef_bwd", dict(mix_ptr=F, rstd_ptr=F, alpha_ptr=F, bias_ptr=F, gpre_ptr=F, gpost_ptr=F, gres_ptr=F, dmix_ptr=F, dz_ptr=F, xcoef_ptr=F, dalpha_ptr=F, scr_ptr=F, T="i32", K="i32", iterations="i32", eps="fp32"), coef
        yield "_sinkhorn_fwd", dict(z_ptr=F, out_ptr=F, T="i32", iterations="i32", eps="fp32"), coef
        yield "_sinkhorn_bwd", dict(z_ptr=F, g_ptr=F, dz_ptr=F, scr_ptr=F, T="i32", iterations="i32", eps="fp32"), coef
        for uni in (False, True):
            yield "_aggregate_fwd", dict(x_ptr=act, w_ptr=F, u_ptr=act, T="i32", h="i32"), dict(UNIFORM=uni, **stream)
            yield "_aggregate_bwd", dict(x_ptr=act, w_ptr=F, du_ptr=act, dx_ptr=act, dw_ptr=F, T="i32", h="i32"), dict(UNIFORM=uni, **stream)
        yield "_post_res_fwd", dict(x_ptr=act, f_ptr=act, post_ptr=F, res_ptr=F, out_ptr=act, T="i32", h="i32"), stream
        yield "_post_res_bwd", dict(x_ptr=act, f_ptr=act, post_ptr=F, res_ptr=F, g_ptr=act, dx_ptr=act, df_ptr=act, dpost_ptr=F, dres_ptr=F, T="i32", h="i32"), dict(n=n, **K.post_res_bwd_meta(T, n, h))
        yield "_contract_fwd", dict(x_ptr=act, fn_ptr=F, base_ptr=F, scale_ptr=F, y_ptr=act, mix_ptr=F, rstd_ptr=F, pre_ptr=F, T="i32", h="i32", eps="fp32"), dict(n=n, **K.contract_fwd_meta(T, n, h))
        row = K.contract_row_meta(T, n, h)
        if row is not None:
            yield "_contract_fwd_row", dict(x_ptr=act, fn_ptr=F, base_ptr=F, scale_ptr=F, y_ptr=act, mix_ptr=F, rstd_ptr=F, pre_ptr=F, T="i32", h="i32", eps="fp32"), dict(n=n, **row)
        row = K.contract_bwd_row_meta(T, n, h)
        if row is not None:
            yield "_contract_bwd_row", dict(x_ptr=act, dy_ptr=act, fn_ptr=F, mix_ptr=F, rstd_ptr=F, pre_ptr=F, scale_ptr=F, dx_ptr=act, dmix_ptr=F, dz_ptr=F, dscale_ptr=F, T="i32", h="i32", eps="fp32"), dict(n=n, **row)
        yield "_contract_bwd_coef", dict(x_ptr=act, dy_ptr=act, mix_ptr=F, rstd_ptr=F, pre_ptr=F, scale_ptr=F, dmix_ptr=F, dz_ptr=F, xcoef_ptr=F, dscale_ptr=F, T="i32", h="i32", eps="fp32"), stream

    done = []
    for act in acts:
        for n in ns:
            for T, h in shapes:
                for name, sig, meta in specs(act, n, T, h):
                    if name not in names:
                        continue
                    opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
                    sig = {**sig, **{k: "constexpr" for k in meta}}
                    c = triton.compile(ASTSource(triton_ops.KERNELS[name], sig, meta), target=GPUTarget("cuda", 90, 32), options=opts)
                    assert c.asm.get("cubin"), name
                    rec = dict(kernel=name, act=act, n=n, T=T, h=h, smem=c.metadata.shared, regs=None, spill=None)
                    if os.path.exists(PTXAS):
                        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
                            fh.write(c.asm["ptx"])
                        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", fh.name, "-o", os.devnull], capture_output=True, text=True).stderr
                        os.unlink(fh.name)
                        regs = re.findall(r"Used (\d+) registers", log)
                        spill = re.findall(r"(\d+) bytes spill stores", log)
                        rec.update(regs=int(regs[0]) if regs else None, spill=int(spill[0]) if spill else None)
                    done.append(rec)
    print(json.dumps(done))
    '''
)

SMALL = ["_mhc_coef_fwd", "_mhc_coef_bwd", "_sinkhorn_fwd", "_sinkhorn_bwd", "_aggregate_fwd", "_aggregate_bwd",
         "_post_res_fwd", "_post_res_bwd", "_contract_bwd_coef"]  # fmt: skip
LARGE = ["_proj_sumsq_fwd", "_proj_bwd", "_contract_fwd", "_contract_fwd_row", "_contract_bwd_row"]


SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def _compile(names, acts, ns, shapes) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([names, acts, ns, shapes])],
        capture_output=True, text=True, timeout=1500, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(done: list[dict], names: list[str]) -> None:
    assert {d["kernel"] for d in done} == set(names), done
    too_much_smem = [d for d in done if d["smem"] > SMEM_LIMIT]
    assert not too_much_smem, f"shared memory above the sm_90 limit (the launch would fail): {too_much_smem}"
    spills = [d for d in done if d["spill"] not in (None, 0)]
    assert not spills, f"ptxas reports register spills: {spills}"


def test_small_kernels_compile_for_sm90():
    """Plus the register-tight one-read contraction kernels (whole rows on chip) at n = 4, h = 7168 and 4096
    (the backward's row kernel is only chosen at h = 4096)."""
    names = SMALL + ["_contract_fwd_row", "_contract_bwd_row"]
    _check(_compile(names, ["*bf16"], [4], [[4096, 7168], [4096, 4096]]), names)


@pytest.mark.slow
def test_all_kernels_compile_for_sm90_every_n_and_dtype():
    """Production launch configs at DSv4 shapes: no compile error, smem within sm_90 limits, no spills."""
    done = _compile(SMALL + LARGE, ["*bf16", "*fp32"], [1, 4, 8], [[32768, 7168], [4096, 4096]])
    _check(done, SMALL + LARGE)
