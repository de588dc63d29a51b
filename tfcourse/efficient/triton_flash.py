r"""FlashAttention as Triton kernels: the forward pass and the backward pass, each one fused GPU kernel.

Dao et al. (2022), *FlashAttention*; Dao (2024), *FlashAttention-2*, Algorithms 1 (forward) and 2 (backward); the
kernel layout follows Triton's fused-attention tutorial (Tillet et al., 2019, *Triton: an intermediate language
and compiler for tiled neural network computations*). :mod:`tfcourse.efficient.flash` is the same algorithm in
PyTorch, loop by loop; here each program instance (one block of ``block_m`` queries of one (batch, head) pair)
keeps its tile of scores, its running maximum and sum and its output accumulator in registers and on-chip
memory, and reads each block of keys and values once from the GPU's main memory.

**Cost.** :math:`O(T_q T_k d)` arithmetic, :math:`O(T_q)` extra memory (one logsumexp per query, saved for the
backward pass); main-memory traffic :math:`O(T_q T_k d^2 / M)` for on-chip memory :math:`M` instead of the
:math:`O(T_q T_k)` of writing and reading the score matrix (Dao et al., 2022, Theorem 2).

**What it gives up.** Nothing in the result (exact attention). It supports causal masking and a scale, not
arbitrary masks, key padding or dropout, and the head size must be at most 256. It needs a CUDA GPU, or Triton's
interpreter on the CPU (``TRITON_INTERPRET=1``), which runs the same kernels with NumPy, slowly, for testing.

``TRITON_INTERPRET=1`` must be in the environment **before triton is first imported** in the process: ``@triton.jit``
reads it when it wraps a function, and Triton's own library functions (``tl.zeros``, ...) are wrapped when triton is
imported, so setting it later (``monkeypatch.setenv`` and a fresh import of this module) is not enough with triton
3.9 (the interpreter then fails with "Cannot call @triton.jit'd outside of the scope of a kernel"). The tests
therefore run the interpreter in a subprocess.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - triton is pinned in requirements.txt
    raise ImportError("tfcourse.efficient.triton_flash needs the triton package (pip install triton)") from error

from ._common import check_positive_int, check_qkv

__all__ = ["flash_attention_triton", "interpreter_enabled"]

MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(Q, K, V, O, L, T_q, T_k, D, DV, scale,
                    stride_qn, stride_qt, stride_kn, stride_kt, stride_vn, stride_vt, stride_on, stride_ot,
                    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # one program: BLOCK_M queries of one (batch, head) pair n; every input is (N, T, d) with unit last stride
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + n * stride_qn + rows[:, None] * stride_qt + offs_d[None, :],
                mask=(rows[:, None] < T_q) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)       # running maximum
    l_i = tl.zeros((BLOCK_M,), tl.float32)                     # running sum of exp(s - m)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)            # running unnormalised output
    hi = T_k
    if IS_CAUSAL:
        hi = tl.minimum(T_k, (pid_m + 1) * BLOCK_M)            # no tile above the diagonal
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + n * stride_kn + cols[:, None] * stride_kt + offs_d[None, :],
                    mask=(cols[:, None] < T_k) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + n * stride_vn + cols[:, None] * stride_vt + offs_dv[None, :],
                    mask=(cols[:, None] < T_k) & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale          # (BLOCK_M, BLOCK_N)
        valid = cols[None, :] < T_k
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        rescale = tl.exp(m_i - m_safe)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + n * stride_on + rows[:, None] * stride_ot + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < T_q) & (offs_dv[None, :] < DV))
    m_final = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(L + n * T_q + rows, m_final + tl.log(l_i), mask=rows < T_q)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, L, DELTA, DK, DV_, T_q, T_k, D, DV, scale,
                          stride_qn, stride_qt, stride_kn, stride_kt, stride_vn, stride_vt, stride_on, stride_ot,
                          IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # one program: the gradients of BLOCK_N keys and values of pair n, looping over blocks of queries
    pid_n = tl.program_id(0)
    n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + n * stride_kn + cols[:, None] * stride_kt + offs_d[None, :],
                mask=(cols[:, None] < T_k) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + n * stride_vn + cols[:, None] * stride_vt + offs_dv[None, :],
                mask=(cols[:, None] < T_k) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M             # only queries i >= the first key of the block
    for start_m in range(lo, T_q, BLOCK_M):
        rows = start_m + offs_m
        q = tl.load(Q + n * stride_qn + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=(rows[:, None] < T_q) & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + n * stride_on + rows[:, None] * stride_ot + offs_dv[None, :],
                     mask=(rows[:, None] < T_q) & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(L + n * T_q + rows, mask=rows < T_q, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a query with no key: zero weights
        delta = tl.load(DELTA + n * T_q + rows, mask=rows < T_q, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale          # (BLOCK_M, BLOCK_N)
        valid = (rows[:, None] < T_q) & (cols[None, :] < T_k)
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)                  # recomputed weights
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee") * scale
    tl.store(DK + n * stride_kn + cols[:, None] * stride_kt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(cols[:, None] < T_k) & (offs_d[None, :] < D))
    tl.store(DV_ + n * stride_vn + cols[:, None] * stride_vt + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=(cols[:, None] < T_k) & (offs_dv[None, :] < DV))


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, L, DELTA, DQ, T_q, T_k, D, DV, scale,
                        stride_qn, stride_qt, stride_kn, stride_kt, stride_vn, stride_vt, stride_on, stride_ot,
                        IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # one program: the gradient of BLOCK_M queries of pair n, looping over blocks of keys
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + n * stride_qn + rows[:, None] * stride_qt + offs_d[None, :],
                mask=(rows[:, None] < T_q) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + n * stride_on + rows[:, None] * stride_ot + offs_dv[None, :],
                 mask=(rows[:, None] < T_q) & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(L + n * T_q + rows, mask=rows < T_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + n * T_q + rows, mask=rows < T_q, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = T_k
    if IS_CAUSAL:
        hi = tl.minimum(T_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + n * stride_kn + cols[:, None] * stride_kt + offs_d[None, :],
                    mask=(cols[:, None] < T_k) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + n * stride_vn + cols[:, None] * stride_vt + offs_dv[None, :],
                    mask=(cols[:, None] < T_k) & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        valid = (rows[:, None] < T_q) & (cols[None, :] < T_k)
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee") * scale
    tl.store(DQ + n * stride_qn + rows[:, None] * stride_qt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < T_q) & (offs_d[None, :] < D))


def interpreter_enabled() -> bool:
    """Whether the kernels run in Triton's interpreter (on the CPU, with NumPy): ``TRITON_INTERPRET=1`` was set
    before triton was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------------

def _launch_args(q, k, v, o, scale, is_causal, block_m, block_n):
    n, t_q, d = q.shape
    t_k, dv = k.shape[1], v.shape[2]
    sizes = dict(IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    common = (t_q, t_k, d, dv, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              o.stride(0), o.stride(1))
    return n, t_q, t_k, common, sizes


class _TritonFlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, block_m, block_n):
        o = torch.empty(*q.shape[:2], v.shape[2], dtype=q.dtype, device=q.device)    # (N, Tq, dv)
        n, t_q, _, common, sizes = _launch_args(q, k, v, o, scale, is_causal, block_m, block_n)
        lse = torch.empty(n, t_q, dtype=torch.float32, device=q.device)              # (N, Tq)
        _forward_kernel[(triton.cdiv(t_q, block_m), n)](q, k, v, o, lse, *common, **sizes)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (is_causal, scale, block_m, block_n)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        is_causal, scale, block_m, block_n = ctx.args
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(dim=-1).contiguous()                     # D_i, (N, Tq)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        n, t_q, t_k, common, sizes = _launch_args(q, k, v, do, scale, is_causal, block_m, block_n)
        _backward_dkdv_kernel[(triton.cdiv(t_k, block_n), n)](q, k, v, do, lse, delta, dk, dv, *common, **sizes)
        _backward_dq_kernel[(triton.cdiv(t_q, block_m), n)](q, k, v, do, lse, delta, dq, *common, **sizes)
        return dq, dk, dv, None, None, None, None


def flash_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                           scale: float | None = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    r"""Exact scaled dot-product attention with fused Triton kernels (FlashAttention-2), forward and backward.

    Equal to :func:`torch.nn.functional.scaled_dot_product_attention` with the same ``is_causal`` (top-left
    aligned) and ``scale``, outputs and gradients, up to rounding (products in full float32 precision, not TF32).

    Args:
        query: ``(..., Tq, dk)`` float32, float16 or bfloat16 tensor on a CUDA device (or on the CPU under Triton's
            interpreter), e.g. ``(B, n_heads, Tq, d_head)``; ``dk <= 256``.
        key: ``(..., Tk, dk)``, same dtype, device and leading dimensions.
        value: ``(..., Tk, dv)``, same dtype, device and leading dimensions; ``dv <= 256``.
        is_causal: query ``i`` attends to keys ``j <= i`` only.
        scale: factor on :math:`QK^\top` (default :math:`1/\sqrt{d_k}`).
        block_m, block_n: tile sizes (queries, keys), powers of two of at least 16.

    Returns:
        ``(..., Tq, dv)`` in the dtype of ``query``; differentiable (the backward pass is two more kernels that
        recompute the weights from the saved logsumexp).

    Raises:
        TypeError, ValueError: on mismatched shapes, dtypes or devices, unsupported sizes or block sizes.
        RuntimeError: if the tensors are not on a CUDA device and the interpreter is off.

    Source: Dao (2024), Algorithms 1 and 2; Triton's fused attention tutorial.
    """
    check_qkv(query, key, value)
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"query: the kernels support float32, float16 and bfloat16, got {query.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"key and value must be on query's device ({query.device}), got {key.device}, {value.device}")
    for name, size in (("dk", query.shape[-1]), ("dv", value.shape[-1])):
        if size > MAX_HEAD_DIM:
            raise ValueError(f"the feature size {name} must be at most {MAX_HEAD_DIM}, got {size}")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        check_positive_int(name, block, minimum=16)
        if block & (block - 1):
            raise ValueError(f"{name} must be a power of two, got {block}")
    if query.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError("flash_attention_triton needs CUDA tensors; on the CPU, set TRITON_INTERPRET=1 before "
                           "triton is imported to run the kernels in Triton's interpreter")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    lead = query.shape[:-2]

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[-2:]).contiguous()     # (N, T, d), unit stride in d

    out = _TritonFlashFunction.apply(flat(query), flat(key), flat(value), bool(is_causal), scale, block_m, block_n)
    return out.reshape(*lead, *out.shape[-2:])
