r"""Recurrence memory: Transformer-XL's segment-level recurrence with relative positions, and the Compressive
Transformer's compressed memory.

* Dai et al. (2019), *Transformer-XL: Attentive language models beyond a fixed-length context*. A long text is read
  in segments of :math:`T` tokens; each layer attends over its own inputs of the current segment *and* the cached
  (gradient-stopped) inputs of up to ``mem_len`` earlier tokens (Sec. 3.2, Eq. in "segment-level recurrence"):
  :math:`\tilde h^{n-1}_\tau = [\operatorname{SG}(m^{n-1}_{\tau}) \circ h^{n-1}_\tau]`. Absolute positions would
  clash between segments, so the score of query :math:`i` and key :math:`j` uses their distance (Sec. 3.3):

  .. math:: A_{ij} = \underbrace{q_i^\top k_j}_{(a)} + \underbrace{q_i^\top W_R R_{i-j}}_{(b)}
                   + \underbrace{u^\top k_j}_{(c)} + \underbrace{v^\top W_R R_{i-j}}_{(d)},

  with :math:`R` the sinusoidal encoding of the distance and :math:`u, v` learned vectors per head.
* Rae et al. (2020), *Compressive Transformers for long-range sequence modelling*, Sec. 3: memories evicted from
  the FIFO memory are not dropped but compressed by a rate :math:`c` (mean pooling here; the paper also tries max
  pooling and convolutions) into a second, compressed memory of ``cmem_len`` slots.

**Cost.** Per segment :math:`O(T (T + M) d)` time and memory for a memory of :math:`M` tokens per layer; the
context reaches about :math:`L \cdot M` tokens back through :math:`L` layers (and :math:`L (M + c\, M_c)` with
a compressed memory of :math:`M_c` slots), while the cost stays that of a window of :math:`T + M`.

**What it gives up.** Gradients do not flow into the memory (no learning of what to store across segments), the
memory costs :math:`L \cdot M \cdot d` numbers per sequence, and compressed memories keep only a summary of the
tokens they stand for.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_same, check_tensor
from ..attention import merge_heads, scaled_dot_product_attention, split_heads
from ..layers import FeedForward
from ..positional import sinusoidal_encoding
from ._common import check_positive_int

__all__ = ["rel_shift", "RelativeMultiHeadAttention", "TransformerXLLayer", "TransformerXL", "compress_memory",
           "update_memory"]


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    r"""Transformer-XL's shift from "score by distance index" to "score by key": for ``x (..., T, K)`` whose column
    ``c`` holds the score of query ``i`` for the distance ``K - 1 - c``, return ``y`` with
    ``y[..., i, j] = x[..., i, j + T - 1 - i]``, the score for the distance :math:`(K - T) + i - j` of key ``j``,
    wherever that distance is non-negative (the other entries are junk and must be masked).

    Done without a gather by padding one zero column, reshaping and dropping the first row (Dai et al., 2019,
    Appendix B).
    """
    check_tensor("x", x, min_ndim=2, shape_hint="(..., T, K)")
    *lead, T, K = x.shape
    padded = torch.nn.functional.pad(x, (1, 0))                       # (..., T, K + 1)
    return padded.reshape(*lead, K + 1, T)[..., 1:, :].reshape(*lead, T, K)


class RelativeMultiHeadAttention(nn.Module):
    r"""Causal multi-head self-attention over ``[memory; x]`` with Transformer-XL's relative positions.

    Args:
        d_model, n_heads: sizes (``d_head = d_model // n_heads``).

    ``forward(x (B, T, d_model), memory (B, M, d_model) or None) -> (B, T, d_model)``: query ``i`` of ``x`` (token
    ``M + i``) attends to the ``M`` memory tokens and to tokens ``j <= i`` of ``x``. Parameters: ``W_q, W_k, W_v,
    W_o`` and ``W_r`` (the projection :math:`W_{k,R}` of the distance encodings), ``u`` and ``v`` ``(n_heads,
    d_head)``.

    Source: Dai et al. (2019), Sec. 3.3 and Appendix B.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        if d_model % n_heads or d_model % 2:
            raise ValueError(f"d_model={d_model} must be even and a multiple of n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.W_r = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(n_heads, self.d_head))
        self.v = nn.Parameter(torch.zeros(n_heads, self.d_head))
        nn.init.normal_(self.u, std=0.02)
        nn.init.normal_(self.v, std=0.02)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, ndim=3, shape_hint="(B, T, d_model)")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        B, T, _ = x.shape
        if memory is not None:
            check_tensor("memory", memory, ndim=3, shape_hint="(B, M, d_model)")
            check_same("memory", (memory.shape[0], memory.shape[2]), (B, self.d_model), "(B, d_model) (x's)")
            context = torch.cat([memory.to(x.dtype), x], dim=1)                    # (B, M + T, d)
        else:
            context = x
        K = context.shape[1]
        M = K - T
        q = split_heads(self.W_q(x), self.n_heads)                                 # (B, nh, T, hs)
        k = split_heads(self.W_k(context), self.n_heads)                           # (B, nh, K, hs)
        v = split_heads(self.W_v(context), self.n_heads)                           # (B, nh, K, hs)
        distances = torch.arange(K - 1, -1, -1, device=x.device)                   # K-1, ..., 0
        R = sinusoidal_encoding(distances, self.d_model, dtype=x.dtype)            # (K, d)
        r = self.W_r(R).view(K, self.n_heads, self.d_head).transpose(0, 1)         # (nh, K, hs)
        bd = rel_shift((q + self.v[:, None]) @ r.transpose(-2, -1))                # (b) + (d): (B, nh, T, K)
        scale = 1.0 / math.sqrt(self.d_head)
        allowed = torch.ones(T, K, dtype=torch.bool, device=x.device).tril(diagonal=M)   # key j <= M + i
        bias = (bd * scale).masked_fill(~allowed, float("-inf"))
        # (a) + (c) = (q + u)^T k: the scores of ordinary attention with the query shifted by u
        out = scaled_dot_product_attention(q + self.u[:, None], k, v, attn_mask=bias, scale=scale)
        return self.W_o(merge_heads(out))                                          # (B, T, d)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}"


class TransformerXLLayer(nn.Module):
    """A Transformer-XL layer (Post-LN, as in the paper): ``h = LN(x + attn(x, memory)); LN(h + FFN(h))``.

    ``forward(x (B, T, d_model), memory (B, M, d_model) or None) -> (B, T, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.attn = RelativeMultiHeadAttention(d_model, n_heads)
        self.ffn = FeedForward(d_model, d_ff, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x + self.dropout(self.attn(x, memory)))
        return self.norm2(h + self.dropout(self.ffn(h)))


def compress_memory(old: torch.Tensor, rate: int) -> torch.Tensor:
    """Compress ``(B, n, d)`` evicted memories by mean pooling over ``rate`` consecutive ones: ``(B, n // rate, d)``
    (Rae et al., 2020, Sec. 3.1, "mean pooling"; ``n`` must be a multiple of ``rate``)."""
    check_tensor("old", old, ndim=3, shape_hint="(B, n, d)")
    check_positive_int("rate", rate)
    if old.shape[1] % rate:
        raise ValueError(f"old: the number of memories {old.shape[1]} must be a multiple of rate={rate}")
    return old.reshape(old.shape[0], old.shape[1] // rate, rate, old.shape[2]).mean(dim=2)


def update_memory(memory: torch.Tensor | None, hidden: torch.Tensor, mem_len: int,
                  compressed: torch.Tensor | None = None, cmem_len: int = 0, rate: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next memory of one layer: ``[memory; hidden]`` keeps its last ``mem_len`` tokens, gradient stopped
    (Transformer-XL); with ``cmem_len > 0`` the evicted ones are compressed by ``rate`` and appended to
    ``compressed``, which keeps its last ``cmem_len`` slots (Compressive Transformer, Rae et al., 2020, Algorithm 1).

    Args:
        memory: ``(B, M, d)`` or ``None``; hidden: ``(B, T, d)``, this segment's inputs of the layer.
        mem_len: tokens kept (``0``: no memory). compressed: ``(B, C, d)`` or ``None``. cmem_len, rate: sizes.

    Returns:
        ``(memory (B, <= mem_len, d), compressed (B, <= cmem_len, d) or None)``, detached.
    """
    check_positive_int("mem_len", mem_len, minimum=0)
    check_positive_int("cmem_len", cmem_len, minimum=0)
    full = hidden if memory is None else torch.cat([memory, hidden], dim=1)
    full = full.detach()
    n_old = max(0, full.shape[1] - mem_len)
    old, kept = full[:, :n_old], full[:, n_old:]
    if cmem_len == 0:
        return kept, None
    if n_old:
        new = compress_memory(old, rate)
        compressed = new if compressed is None else torch.cat([compressed, new], dim=1)
        compressed = compressed[:, -cmem_len:]
    return kept, compressed


class TransformerXL(nn.Module):
    """A small Transformer-XL language model: embedding, :class:`TransformerXLLayer` s, output layer, and a memory
    per layer carried from segment to segment (optionally with a Compressive Transformer's compressed memory).

    Args:
        vocab_size, d_model, n_heads, n_layers, d_ff: sizes.
        mem_len: memory tokens per layer. cmem_len: compressed slots per layer (0: none). rate: compression rate.

    ``forward(idx (B, T), state=None) -> (logits (B, T, vocab_size), state)`` where ``state`` is
    ``(memories, compressed)``, two lists with one ``(B, M, d_model)`` tensor (or ``None``) per layer: pass it back
    with the next segment. Each layer attends over ``[compressed; memory; segment]``.

    Source: Dai et al. (2019), Sec. 3.2; Rae et al. (2020), Sec. 3.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int = 256,
                 mem_len: int = 32, cmem_len: int = 0, rate: int = 2):
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("n_layers", n_layers)
        check_positive_int("rate", rate)
        self.mem_len, self.cmem_len, self.rate = mem_len, cmem_len, rate
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(TransformerXLLayer(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor, state=None):
        check_tensor("idx", idx, ndim=2, shape_hint="(B, T)")
        n = len(self.layers)
        memories, compressed = state if state is not None else ([None] * n, [None] * n)
        h = self.embed(idx)                                                        # (B, T, d)
        new_memories, new_compressed = [], []
        for layer, mem, cmem in zip(self.layers, memories, compressed):
            context = [t for t in (cmem, mem) if t is not None]
            memory = torch.cat(context, dim=1) if context else None
            m, c = update_memory(mem, h, self.mem_len, cmem, self.cmem_len, self.rate)
            new_memories.append(m if self.mem_len else None)
            new_compressed.append(c)
            h = layer(h, memory)
        return self.head(h), (new_memories, new_compressed)
