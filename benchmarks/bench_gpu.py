"""GPU benchmarks (`make bench-gpu`): the Triton flash kernel against PyTorch's, and GPT training throughput.

Writes the section ``"gpu"`` of ``benchmarks/results/<host-kind>.json`` (for example ``gpu-nvidia-h100-80gb-hbm3``):

* ``matmul_bf16_tflops``: the card's measured bfloat16 matrix-multiply rate (the best of a few 8192 x 8192
  products), the peak against which the other rates are read.
* ``flash_forward``: :func:`tfcourse.efficient.triton_flash.flash_attention_triton` against
  :func:`torch.nn.functional.scaled_dot_product_attention` restricted to its FlashAttention backend, forward pass,
  bfloat16, head dimension 64, causal and not, T = 1024 to 16384 (batch x T = 16384 tokens, 16 heads): time, TFLOP/s
  (:math:`4 B H T^2 d`, halved when causal) and the ratio of SDPA's time to ours, min / median / max over trials
  measured side by side (target on an H100: ours >= 0.7x).
* ``gpt_training``: tokens per second of a training step (forward, backward, AdamW) of :class:`tfcourse.models.GPT`
  under :func:`tfcourse.device.autocast` (bf16) at ``TFCOURSE_SCALE=full`` sizes: chapter 9's character GPT
  (6 layers, 4 heads, width 384, block 256, batch 16) and GPT-2 small (124M parameters, block 1024, batch 8); model
  FLOP utilisation = :func:`tfcourse.scaling.training_flops` per second / the measured bf16 matmul rate.

Usage: ``python benchmarks/bench_gpu.py`` on a CUDA machine. ``--smoke`` runs every code path at toy sizes, on the
CPU where there is no GPU (no Triton, no FlashAttention backend: those two are then left out), and writes nothing:
it checks the script, not the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch
import torch.nn.functional as F

from common import matmul_flops_per_s, paired, time_call, write_results
from tfcourse.device import autocast
from tfcourse.models import GPT, GPTConfig
from tfcourse.scaling import training_flops

TARGET_FLASH = 0.7
HEAD_DIM, HEADS, TOKENS = 64, 16, 16384


def sdpa_flash_backend(device: torch.device):
    """PyTorch's SDPA restricted to its FlashAttention kernel on CUDA (elsewhere: no restriction)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def bench_flash_forward(device: torch.device, lengths: list[int], trials: int, repeats: int, peak: float) -> list:
    if device.type == "cuda":
        from tfcourse.efficient.triton_flash import flash_attention_triton
    else:  # --smoke on a CPU: the script's logic only, with PyTorch's function in the kernel's place
        flash_attention_triton = F.scaled_dot_product_attention
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for T in lengths:
        B = max(1, TOKENS // T)
        q, k, v = (torch.randn(B, HEADS, T, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        for causal in (False, True):
            with torch.no_grad():
                ours = flash_attention_triton(q, k, v, is_causal=causal)
                with sdpa_flash_backend(device):
                    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                err = (ours.float() - theirs.float()).abs().max().item()

                def run_ours():
                    flash_attention_triton(q, k, v, is_causal=causal)

                def run_sdpa():
                    with sdpa_flash_backend(device):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                result = paired(run_ours, run_sdpa, trials=trials, repeats=repeats)
            flops = 4 * B * HEADS * T * T * HEAD_DIM * (0.5 if causal else 1.0)
            row = {"T": T, "B": B, "n_heads": HEADS, "d_head": HEAD_DIM, "causal": causal, "dtype": str(dtype),
                   "ours_ms": 1e3 * result["a_s"], "sdpa_ms": 1e3 * result["b_s"],
                   "ours_tflops": flops / result["a_s"] / 1e12, "sdpa_tflops": flops / result["b_s"] / 1e12,
                   "ours_fraction_of_matmul": flops / result["a_s"] / 1e12 / peak,
                   "ratio": result["ratio"], "max_abs_difference": err, "target": TARGET_FLASH}
            rows.append(row)
            print(f"T={T:6d} causal={causal!s:5} ours {row['ours_tflops']:7.1f} TFLOP/s  sdpa "
                  f"{row['sdpa_tflops']:7.1f} TFLOP/s  ratio median {row['ratio']['median']:.2f}  "
                  f"max |diff| {err:.1e}", flush=True)
    return rows


GPT_CONFIGS = {
    # chapter 9's character GPT at TFCOURSE_SCALE=full (notebooks/09_gpt.ipynb: N_LAYER, N_EMBD, CHAR_BLOCK, BATCH)
    "chapter 9 character GPT (full scale)": (dict(n_layer=6, n_head=4, n_embd=384, block_size=256, vocab_size=65), 16),
    # GPT-2 small, the model of chapter 13's compute tables (vocabulary padded to a multiple of 64, as nanoGPT's)
    "GPT-2 small (124M)": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), 8),
}
SMOKE_CONFIG = (dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65), 4)


def bench_gpt_training(device: torch.device, configs: dict, steps: int, peak: float) -> list:
    rows = []
    for name, (sizes, batch) in configs.items():
        torch.manual_seed(0)
        config = GPTConfig(**sizes)
        model = GPT(config).to(device).train()
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        T = config.block_size
        idx = torch.randint(0, config.vocab_size, (batch, T + 1), device=device)
        x, y = idx[:, :-1], idx[:, 1:]

        def step():
            with autocast(device):
                loss = model(x, y)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):   # warm-up: allocator, cuBLAS heuristics, the fused optimiser's first step
            step()
        seconds = time_call(step, steps)
        tokens_per_s = batch * T / seconds
        flops = training_flops(config, batch * T)
        row = {"model": name, "config": sizes, "batch": batch, "autocast_bf16": device.type == "cuda",
               "parameters": sum(p.numel() for p in model.parameters()), "step_ms": 1e3 * seconds,
               "tokens_per_s": tokens_per_s, "tflops": flops / seconds / 1e12,
               "mfu": flops / seconds / 1e12 / peak}
        rows.append(row)
        print(f"{name:38} {tokens_per_s:12,.0f} tokens/s  {row['tflops']:6.1f} TFLOP/s  MFU {row['mfu']:.1%}",
              flush=True)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any device, nothing written")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_gpu.py needs a CUDA device (run with --smoke to check the script on a CPU)")
    if args.smoke:
        peak = matmul_flops_per_s(256, 2, torch.float32, device) / 1e12
        bench_flash_forward(device, [64, 128], trials=2, repeats=1, peak=peak)
        bench_gpt_training(device, {"smoke": SMOKE_CONFIG}, steps=1, peak=peak)
        print("--smoke: the script's code paths at toy sizes; nothing written")
        return
    torch.backends.cuda.matmul.allow_tf32 = True   # float32 parts of the GPT step (the optimiser) as in practice
    peak = matmul_flops_per_s(8192, 20, torch.bfloat16, device) / 1e12
    print(f"measured bf16 matmul rate: {peak:.0f} TFLOP/s ({torch.cuda.get_device_name(device)})", flush=True)
    flash = bench_flash_forward(device, [1024, 2048, 4096, 8192, 16384], trials=7, repeats=10, peak=peak)
    gpt = bench_gpt_training(device, GPT_CONFIGS, steps=10, peak=peak)
    path = write_results("gpu", {"matmul_bf16_tflops": peak, "flash_forward": flash, "gpt_training": gpt})
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
