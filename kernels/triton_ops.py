"""Triton kernels: fused int8 dequantize, RMSNorm, rotate-half RoPE and SwiGLU (forward and backward).

Imported only when a Triton path is taken (kernels/__init__.py: `accelerated`), so triton stays
optional. Each public function here has the signature of the PyTorch function it replaces
(model/llama.py: rms_norm, apply_rope, swiglu; model/quant.py: dequantize_int8) and is tested
against it (tests/test_kernels.py). All arithmetic is fp32 in registers, one rounding at the
store; the references round after each op in the input dtype, so bf16 results differ by ~1 ulp.

Under TRITON_INTERPRET=1 these run on CPU tensors (slowly); note the interpreter truncates
fp32 -> bf16 instead of rounding to nearest, so bf16 comparisons there differ by up to 1 ulp more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- int8 dequantize


@triton.jit
def _int8_dequant_kernel(W, SCB, OUT, M, N, inv127, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # lm_head-sized weights pass 2^31 bytes
    w = tl.load(W + offs, mask=mask, other=0).to(tl.float32)
    # scb * fp32(1/127), as the reference: bit-identical results, not just close ones.
    scale = tl.load(SCB + rows, mask=rmask, other=0.0).to(tl.float32) * inv127
    tl.store(OUT + offs, (w * scale[:, None]).to(OUT.dtype.element_ty), mask=mask)


def int8_dequant_triton(w_int8: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    M, N = w_int8.shape
    w_int8, scb = w_int8.contiguous(), scb.contiguous()
    out = torch.empty((M, N), dtype=dtype, device=w_int8.device)
    BLOCK_M, BLOCK_N = 16, 256  # 4k-element tiles: enough bytes in flight per program
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int8_dequant_kernel[grid](w_int8, scb, out, M, N, 1.0 / 127.0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               num_warps=4)
    return out


# ---------------------------------------------------------------- RMSNorm


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    # HF rounds the normalised x to the input dtype before the weight multiply; so do we.
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, M, N, ROWS_PER_PROG,
                    BLOCK: tl.constexpr, HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        mask = cmask & (cols * 0 + row < M)  # a block, not a scalar: the interpreter needs it
        off = row.to(tl.int64) * N + cols
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, M - 1))  # rows past M are masked out anyway
        xhat = x * rstd
        if HAS_DW:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        dxhat = dy * w
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - xhat * mean(g * xhat))
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / N))
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=cmask)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()  # (M, N)
        weight = weight.contiguous()
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        BLOCK = triton.next_power_of_2(N)
        _rms_fwd_kernel[(M,)](x2, weight, y, rstd, N, eps, BLOCK=BLOCK, num_warps=_warps(BLOCK))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N).contiguous()
        dx = torch.empty_like(x2)
        has_dw = ctx.needs_input_grad[1]
        if has_dw:  # a few programs per SM each sum their rows' dw; torch adds the partials
            n_prog = min(M, 4 * _sm_count(x2.device))
            dw_part = torch.empty((n_prog, N), dtype=torch.float32, device=x2.device)
        else:  # LoRA: the norm weights are frozen, one program per row
            n_prog, dw_part = M, dx  # dw_part unused (HAS_DW=False)
        rows_per_prog = triton.cdiv(M, n_prog)
        n_prog = triton.cdiv(M, rows_per_prog)
        BLOCK = triton.next_power_of_2(N)
        _rms_bwd_kernel[(n_prog,)](dy2, x2, weight, rstd, dx, dw_part, M, N, rows_per_prog,
                                   BLOCK=BLOCK, HAS_DW=has_dw, num_warps=_warps(BLOCK))
        dw = dw_part[:n_prog].sum(0).to(weight.dtype) if has_dw else None
        return dx.view(ctx.shape), dw, None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter on CPU: few programs, each looping over many rows


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNormFn.apply(x, weight, eps)


# ---------------------------------------------------------------- RoPE (rotate-half)


@triton.jit
def _rope_heads(X, O, x_base, o_base, sxh, sxd, soh, sod, c1, c2, s1, s2, H, HALF,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < HALF)
    x1 = tl.load(X + x_base + h * sxh + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_base + h * sxh + (d + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation: [c1 -s1; s2 c2]^T
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(O + o_base + h * soh + d * sod, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(O + o_base + h * soh + (d + HALF) * sod, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, HQ, HK, HALF,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                 sob, soh, sot, sod, spb, sph, spt, spd,
                 scb, sct, scd,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr):
    # One program per (batch, position): cos/sin are read once and applied to every q and k head.
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < HALF
    cb = b * scb + t * sct
    c1 = tl.load(COS + cb + d * scd, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cb + (d + HALF) * scd, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cb + d * scd, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cb + (d + HALF) * scd, mask=dm, other=0.0).to(tl.float32)
    _rope_heads(Q, QO, b * sqb + t * sqt, b * sob + t * sot, sqh, sqd, soh, sod,
                c1, c2, s1, s2, HQ, HALF, BLOCK_HQ, BLOCK_D, BACKWARD)
    _rope_heads(K, KO, b * skb + t * skt, b * spb + t * spt, skh, skd, sph, spd,
                c1, c2, s1, s2, HK, HALF, BLOCK_HK, BLOCK_D, BACKWARD)


def _rope_launch(q, k, cos, sin, backward: bool):
    B, HQ, T, hd = q.shape
    HK = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # keeps q's (possibly transposed) strides
    _rope_kernel[(B * T,)](
        q, k, qo, ko, cos, sin, T, HQ, HK, hd // 2,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *cos.stride(),
        BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK),
        BLOCK_D=triton.next_power_of_2(hd // 2), BACKWARD=backward, num_warps=4)
    return qo, ko


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dqo, dko, cos, sin, backward=True)
        return dq, dk, None, None


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, T, hd = q.shape
    if hd % 2:
        raise ValueError(f"rope: head_dim {hd} must be even")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.expand(B, T, hd), sin.expand(B, T, hd)  # broadcast batch: stride 0
    if cos.stride() != sin.stride():  # the kernel reads both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return _RoPEFn.apply(q, k, cos, sin)


# ---------------------------------------------------------------- SwiGLU


@triton.jit
def _swiglu_fwd_kernel(G, U, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, (g * tl.sigmoid(g) * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DO, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    # silu'(g) = sg * (1 + g * (1 - sg))
    tl.store(DG + offs, (do * u * sg * (1.0 + g * (1.0 - sg))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (do * g * sg).to(DU.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, out, n, BLOCK=_SWIGLU_BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, dout, dg, du, n,
                                                            BLOCK=_SWIGLU_BLOCK, num_warps=4)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return _SwiGLUFn.apply(gate, up)
