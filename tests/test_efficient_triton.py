"""tfcourse.efficient.triton_flash: the Triton FlashAttention kernels (forward and backward) against torch's SDPA.

On the CPU the kernels run in Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton is first
imported (``@triton.jit`` reads it when it wraps a function, and triton's own library functions are wrapped at
import), and this test session has imported triton already, so the interpreter runs in a subprocess: one run, once
per session, computes every case and the tests below check each. The GPU tests compile the kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if not sys.platform.startswith("linux"):  # triton publishes wheels for Linux only; there it is required
    pytest.skip("triton has no wheels for this platform", allow_module_level=True)

from tfcourse.efficient.triton_flash import flash_attention_triton, interpreter_enabled  # noqa: E402

# (B, H, Tq, Tk, dk, dv, is_causal, block_m, block_n): T not a multiple of the blocks, cross-attention lengths,
# unequal key and value sizes, and one case with blocks of different sizes.
CASES = [
    (2, 2, 37, 37, 16, 16, False, 16, 16),
    (2, 2, 37, 37, 16, 16, True, 16, 16),
    (1, 3, 50, 23, 8, 12, False, 16, 16),
    (1, 2, 23, 50, 16, 16, True, 16, 16),
    (1, 2, 64, 64, 32, 32, True, 32, 16),
    (1, 1, 1, 5, 4, 4, False, 16, 16),
]
TOL = 1e-5

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from tfcourse.efficient.triton_flash import flash_attention_triton, interpreter_enabled

    assert interpreter_enabled()
    results = []
    for i, (B, H, Tq, Tk, d, dv, causal, bm, bn) in enumerate(json.loads(sys.argv[1])):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, H, t, e, generator=g).requires_grad_() for t, e in ((Tq, d), (Tk, d), (Tk, dv)))
        ours = flash_attention_triton(q, k, v, is_causal=causal, block_m=bm, block_n=bn)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grad = torch.randn(theirs.shape, generator=g)
        ours_g = torch.autograd.grad(ours, (q, k, v), grad)
        theirs_g = torch.autograd.grad(theirs, (q, k, v), grad)
        results.append(dict(shape=list(ours.shape), expected=list(theirs.shape), dtype=str(ours.dtype),
                            out=(ours - theirs).abs().max().item(),
                            grads=[(a - b).abs().max().item() for a, b in zip(ours_g, theirs_g)]))
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted():
    """Run every case in a subprocess with Triton's interpreter (about 10 s, most of it importing torch)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    return results


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_interpreted_kernels_equal_sdpa(interpreted, case):
    result = interpreted[case]
    assert result["shape"] == result["expected"] and result["dtype"] == "torch.float32"
    assert result["out"] < TOL, f"output differs by {result['out']}"
    assert max(result["grads"]) < TOL, f"gradients (q, k, v) differ by {result['grads']}"


def test_without_cuda_or_interpreter_it_says_what_to_do():
    if interpreter_enabled():
        pytest.skip("this session runs with TRITON_INTERPRET=1")
    q = torch.randn(1, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attention_triton(q, q, q)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="key: the feature size"):
        flash_attention_triton(q, q[..., :8], q)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        flash_attention_triton(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="at most 256"):
        big = torch.randn(1, 4, 300)
        flash_attention_triton(big, big, big)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention_triton(q, q, q, block_m=48)
    with pytest.raises(ValueError, match="block_n"):
        flash_attention_triton(q, q, q, block_n=8)


# ------------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 1000, 64, 64), (1, 2, 333, 517, 32, 48), (1, 1, 4096, 4096, 128, 128)])
def test_cuda_float32_equals_float64_reference(is_causal, shape):
    B, H, Tq, Tk, d, dv = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, t, e, generator=g, dtype=torch.float64) for t, e in ((Tq, d), (Tk, d), (Tk, dv)))
    grad = torch.randn(B, H, Tq, dv, generator=g, dtype=torch.float64)
    cuda = [t.float().cuda().requires_grad_() for t in (q, k, v)]
    ours = flash_attention_triton(*cuda, is_causal=is_causal)
    ours_g = torch.autograd.grad(ours, cuda, grad.float().cuda())
    ref = [t.requires_grad_() for t in (q, k, v)]
    theirs = F.scaled_dot_product_attention(*ref, is_causal=is_causal)
    theirs_g = torch.autograd.grad(theirs, ref, grad)
    torch.testing.assert_close(ours.double().cpu(), theirs.detach(), atol=TOL, rtol=TOL)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-4)  # sums over T keys or queries


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_close_to_sdpa(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 777, 64, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3))
    ours = flash_attention_triton(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert ours.dtype == dtype
    assert (ours.float() - theirs).abs().max() < (1e-2 if dtype == torch.float16 else 3e-2)
    ours.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
