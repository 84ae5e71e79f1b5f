"""Fused Triton kernels for masked MLP activations: `act(gate) * up * mask` and `act(h) * mask`.

Why fuse: in eager mode a masked gated MLP reads and writes the [tokens, intermediate] activation
three times (act, * up, * mask) and autograd keeps act(gate) and the product alive for backward.
One kernel reads gate and up once and writes the masked product once; backward recomputes act(gate)
from the saved gate and up instead of storing it (as Liger Kernel's SwiGLU does, plus the mask).

Each op is a Triton kernel pair (forward, backward) + a `torch.autograd.Function` + a drop-in patch
for a Hugging Face MLP module. Math is fp32 inside the kernel, rounded once to the input dtype.
GELU-tanh uses the identity 0.5 * (1 + tanh(z)) == sigmoid(2z), which needs no tanh intrinsic (so it
also runs under TRITON_INTERPRET=1) and is more accurate than 1 + tanh(z) for large negative inputs.

Importing this module imports triton; `fnscale.kernels` imports it lazily. Set TRITON_INTERPRET=1
before importing it to run the kernels on CPU tensors (slow; for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .patch import set_forward

_ACT_IDS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _act_fwd_bwd(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in fp32; the derivative is dead code (eliminated) where a kernel ignores it."""
    if ACT == 0:  # silu(x) = x * s, s = sigmoid(x)
        s = tl.sigmoid(x)
        a = x * s
        da = s + a * (1.0 - s)
    else:  # gelu_tanh(x) = x * sigmoid(2z), z = sqrt(2/pi) * (x + c x^3)
        k = 2.0 * 0.7978845608028654
        s = tl.sigmoid(k * (x + 0.044715 * x * x * x))
        a = x * s
        da = s + a * (1.0 - s) * k * (1.0 + 3.0 * 0.044715 * x * x)
    return a, da


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets, in-bounds mask and column ids of this program's [BLOCK_M, BLOCK_N] tile of a row-major matrix."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    inb = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return offs, inb, cols


@triton.jit
def _gated_fwd_kernel(G, U, M, Y, n_rows, n_cols, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, inb, cols = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    m = tl.load(M + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=inb, other=0.0).to(tl.float32)
    a, _ = _act_fwd_bwd(g, ACT)
    tl.store(Y + offs, (a * u * m[None, :]).to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _gated_bwd_kernel(
    DY, G, U, M, DG, DU, n_rows, n_cols, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    offs, inb, cols = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    m = tl.load(M + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=inb, other=0.0).to(tl.float32) * m[None, :]
    g = tl.load(G + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=inb, other=0.0).to(tl.float32)
    a, da = _act_fwd_bwd(g, ACT)
    tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=inb)
    tl.store(DG + offs, (dy * u * da).to(DG.dtype.element_ty), mask=inb)


@triton.jit
def _act_fwd_kernel(H, M, Y, n_rows, n_cols, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, inb, cols = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    m = tl.load(M + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=inb, other=0.0).to(tl.float32)
    a, _ = _act_fwd_bwd(h, ACT)
    tl.store(Y + offs, (a * m[None, :]).to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _act_bwd_kernel(DY, H, M, DH, n_rows, n_cols, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, inb, cols = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    m = tl.load(M + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=inb, other=0.0).to(tl.float32) * m[None, :]
    h = tl.load(H + offs, mask=inb, other=0.0).to(tl.float32)
    _, da = _act_fwd_bwd(h, ACT)
    tl.store(DH + offs, (dy * da).to(DH.dtype.element_ty), mask=inb)


def _launch(kernel, n_rows: int, n_cols: int, act: str, *tensors: torch.Tensor) -> None:
    """Launch an elementwise kernel over a row-major [n_rows, n_cols] matrix in tiles of ~4096 elements."""
    if n_rows == 0 or n_cols == 0:
        return
    block_n = min(triton.next_power_of_2(n_cols), 1024)
    block_m = max(1, 4096 // block_n)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    kernel[grid](*tensors, n_rows, n_cols, ACT=_ACT_IDS[act], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8)


def _check(x: torch.Tensor, mask: torch.Tensor, act: str) -> None:
    if act not in _ACT_IDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(_ACT_IDS)}")
    if mask.dim() != 1 or mask.numel() != x.shape[-1]:
        raise ValueError(f"mask must be 1-D with {x.shape[-1]} entries (the last dim), got shape {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but the activations are on {x.device}")


class GatedActMulMask(torch.autograd.Function):
    """`act(gate) * up * mask` fused; saves gate and up only, recomputes act(gate) in backward. No grad for mask."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, mask: torch.Tensor, act: str) -> torch.Tensor:
        _check(gate, mask, act)
        if gate.shape != up.shape:
            raise ValueError(f"gate and up differ in shape: {tuple(gate.shape)} vs {tuple(up.shape)}")
        dtype = torch.promote_types(gate.dtype, up.dtype)
        n = gate.shape[-1]
        g = gate.to(dtype).reshape(-1, n).contiguous()
        u = up.to(dtype).reshape(-1, n).contiguous()
        m = mask.contiguous()
        y = torch.empty_like(g)
        _launch(_gated_fwd_kernel, g.shape[0], n, act, g, u, m, y)
        ctx.save_for_backward(g, u, m)
        ctx.act, ctx.shape, ctx.dtypes = act, gate.shape, (gate.dtype, up.dtype)
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u, m = ctx.saved_tensors
        dy = dy.reshape(g.shape).contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _launch(_gated_bwd_kernel, g.shape[0], g.shape[1], ctx.act, dy, g, u, m, dg, du)
        return dg.view(ctx.shape).to(ctx.dtypes[0]), du.view(ctx.shape).to(ctx.dtypes[1]), None, None


class ActMask(torch.autograd.Function):
    """`act(h) * mask` fused; saves h only, recomputes act'(h) in backward. No grad for mask."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, mask: torch.Tensor, act: str) -> torch.Tensor:
        _check(h, mask, act)
        n = h.shape[-1]
        x = h.reshape(-1, n).contiguous()
        m = mask.contiguous()
        y = torch.empty_like(x)
        _launch(_act_fwd_kernel, x.shape[0], n, act, x, m, y)
        ctx.save_for_backward(x, m)
        ctx.act, ctx.shape = act, h.shape
        return y.view(h.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, m = ctx.saved_tensors
        dy = dy.reshape(x.shape).contiguous()
        dx = torch.empty_like(x)
        _launch(_act_bwd_kernel, x.shape[0], x.shape[1], ctx.act, dy, x, m, dx)
        return dx.view(ctx.shape), None, None


def triton_gated_act_mul_mask(
    gate: torch.Tensor, up: torch.Tensor, mask: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """Fused `act(gate) * up * mask` (same contract as `reference.gated_act_mul_mask`)."""
    return GatedActMulMask.apply(gate, up, mask, act)


def triton_act_mask(h: torch.Tensor, mask: torch.Tensor, act: str = "gelu_tanh") -> torch.Tensor:
    """Fused `act(h) * mask` (same contract as `reference.act_mask`)."""
    return ActMask.apply(h, mask, act)


def _on(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask if mask.device == like.device else mask.to(like.device)


def patch_gated_mlp(mlp: torch.nn.Module, mask: torch.Tensor, act: str) -> Callable[[], None]:
    """Drop-in for a Llama-style MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`): compute
    `down_proj(act(gate_proj(x)) * up_proj(x) * mask)` with the fused kernel. The projections are called
    as modules, so LoRA/quantized wrappers and their hooks still run. Returns a function that undoes it."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return mlp.down_proj(GatedActMulMask.apply(gate, up, _on(mask, gate), act))

    return set_forward(mlp, forward)


def patch_gpt2_mlp(mlp: torch.nn.Module, mask: torch.Tensor, act: str) -> Callable[[], None]:
    """Drop-in for a GPT-2 MLP (`dropout(c_proj(act(c_fc(x))))`): `dropout(c_proj(act(c_fc(x)) * mask))`
    with the fused kernel. Returns a function that undoes it."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = mlp.c_fc(x)
        return mlp.dropout(mlp.c_proj(ActMask.apply(h, _on(mask, h), act)))

    return set_forward(mlp, forward)
