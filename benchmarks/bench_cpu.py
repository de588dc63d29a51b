"""CPU benchmarks of the reference implementations against their peers (`make bench`).

Writes the section ``"cpu"`` of ``benchmarks/results/<host-kind>.json``:

* ``gpt_train_step``: one training step (forward, backward, AdamW) of our :class:`tfcourse.models.GPT` against
  ``transformers.GPT2LMHeadModel`` with the same configuration and weights (n_layer 4, n_head 4, n_embd 128, block
  128, vocabulary 65, batch 32): tokens per second of each and their ratio (target: ours >= 1.0x); the achieved
  GFLOP/s (:func:`tfcourse.scaling.training_flops`) against the machine's measured float32 matrix-multiply rate.
* ``generation``: 256 new tokens at batch 1 with and without the KV cache (target: the cache >= 5x).
* ``generation_larger``: the same at chapter 9's full-scale size (6 layers, width 384), for information.
* ``multihead_attention``: forward and backward of our :class:`tfcourse.attention.MultiHeadAttention` against
  ``torch.nn.MultiheadAttention`` (B 16, T 256, d_model 512, 8 heads; target: ours >= 0.9x).

Every ratio is measured side by side (``benchmarks/common.py``) and summarised by its minimum, median and maximum.
Usage: ``python benchmarks/bench_cpu.py [--quick]`` (``--quick``: fewer trials and nothing written, a
smoke test).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from common import matmul_flops_per_s, paired, write_results
from tfcourse.attention import MultiHeadAttention
from tfcourse.models import GPT, GPTConfig
from tfcourse.scaling import training_flops

TARGETS = {"gpt_train_step": 1.0, "generation": 5.0, "multihead_attention": 0.9}


def bench_gpt_train_step(trials: int, repeats: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    B, T = 32, 128
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=T, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    ours = GPT.from_hf(hf)
    hf.train()
    ours.train()
    idx = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(0))
    opt_ours, opt_hf = torch.optim.AdamW(ours.parameters()), torch.optim.AdamW(hf.parameters())

    def step_ours():
        loss = ours(idx, idx)[1]
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_hf():
        loss = hf(input_ids=idx, labels=idx).loss       # Hugging Face shifts the labels itself
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    result = paired(step_ours, step_hf, trials=trials, repeats=repeats)
    flops = training_flops(ours.config, B * T)
    peak = matmul_flops_per_s(1024, 10) / 1e9       # the float32 matrix-multiply rate, GFLOP/s
    return {"config": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": T, "vocab_size": 65, "batch": B},
            "peer": "transformers.GPT2LMHeadModel (attn_implementation=%s)" % hf.config._attn_implementation,
            "ours_tokens_per_s": B * T / result["a_s"], "peer_tokens_per_s": B * T / result["b_s"],
            "ratio": result["ratio"], "target": TARGETS["gpt_train_step"],
            "ours_gflops": flops / result["a_s"] / 1e9, "matmul_gflops": peak,
            "flops_per_step": flops}


NEW_TOKENS = 256


def cache_speedup(sizes: dict, trials: int) -> dict:
    """Greedy generation of ``NEW_TOKENS`` tokens at batch 1 from a one-token prompt by ``GPT(GPTConfig(**sizes))``,
    with the KV cache against without, side by side (the two must give the same tokens)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**sizes)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    with_cache = lambda: model.generate(prompt, NEW_TOKENS, temperature=0.0, use_cache=True)      # noqa: E731
    without = lambda: model.generate(prompt, NEW_TOKENS, temperature=0.0, use_cache=False)        # noqa: E731
    assert torch.equal(with_cache(), without()), "the cache must not change the tokens"
    result = paired(with_cache, without, trials=trials, repeats=1, warmup=1)
    return {"config": {**sizes, "batch": 1, "prompt_tokens": 1, "new_tokens": NEW_TOKENS},
            "cache_tokens_per_s": NEW_TOKENS / result["a_s"], "no_cache_tokens_per_s": NEW_TOKENS / result["b_s"],
            "ratio": result["ratio"]}


def bench_generation(trials: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    result = cache_speedup(dict(n_layer=4, n_head=4, n_embd=128, block_size=512, vocab_size=65), trials)
    # For context, the same measurement of Hugging Face's GPT-2 with the same configuration (its generate loop).
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=512, n_embd=128, n_layer=4, n_head=4,
                                    bos_token_id=0, eos_token_id=0)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def hf_generate(use_cache: bool) -> torch.Tensor:
        return hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           use_cache=use_cache, pad_token_id=0)

    peer = paired(lambda: hf_generate(True), lambda: hf_generate(False), trials=max(3, trials // 3), repeats=1,
                  warmup=1)
    return {**result, "target": TARGETS["generation"],
            "peer": "transformers.GPT2LMHeadModel.generate (greedy), same configuration",
            "peer_cache_tokens_per_s": NEW_TOKENS / peer["a_s"], "peer_no_cache_tokens_per_s": NEW_TOKENS / peer["b_s"],
            "peer_ratio": peer["ratio"]}


def bench_generation_larger(trials: int) -> dict:
    """The same measurement for chapter 9's character GPT at ``TFCOURSE_SCALE=full`` (6 layers, 4 heads, width
    384): where a step's arithmetic outweighs its fixed overhead, the cache gains more. For information; the
    target is set on the configuration above."""
    return cache_speedup(dict(n_layer=6, n_head=4, n_embd=384, block_size=512, vocab_size=65), trials)


def bench_multihead_attention(trials: int, repeats: int) -> dict:
    torch.manual_seed(0)
    B, T, d, h = 16, 256, 512, 8
    theirs = nn.MultiheadAttention(d, h, batch_first=True)
    ours = MultiHeadAttention.from_torch(theirs)
    x = torch.randn(B, T, d, requires_grad=True)

    def run_ours():
        out, _ = ours(x, x, x)
        out.sum().backward()

    def run_theirs():
        out, _ = theirs(x, x, x, need_weights=False)
        out.sum().backward()

    result = paired(run_ours, run_theirs, trials=trials, repeats=repeats)
    return {"config": {"B": B, "T": T, "d_model": d, "n_heads": h}, "peer": "torch.nn.MultiheadAttention",
            "ours_ms": 1e3 * result["a_s"], "peer_ms": 1e3 * result["b_s"], "ratio": result["ratio"],
            "target": TARGETS["multihead_attention"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, results not written (a smoke test)")
    args = parser.parse_args()
    trials = 3 if args.quick else 11
    warnings.filterwarnings("ignore")
    results = {
        "gpt_train_step": bench_gpt_train_step(trials, repeats=1 if args.quick else 3),
        "generation": bench_generation(trials),
        "generation_larger": bench_generation_larger(3 if args.quick else 5),
        "multihead_attention": bench_multihead_attention(trials, repeats=1 if args.quick else 3),
    }
    for name, r in results.items():
        ratio = r["ratio"]
        if "target" not in r:
            print(f"{name:22} ratio min {ratio['min']:.2f}  median {ratio['median']:.2f}  max {ratio['max']:.2f}")
            continue
        verdict = "meets" if ratio["median"] >= r["target"] else "MISSES"
        print(f"{name:22} ratio min {ratio['min']:.2f}  median {ratio['median']:.2f}  max {ratio['max']:.2f}  "
              f"(target >= {r['target']}x: {verdict})")
    if args.quick:
        print("--quick: a smoke test; nothing written")
        return
    path = write_results("cpu", results)
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
