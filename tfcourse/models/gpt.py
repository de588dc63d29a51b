"""GPT: the decoder-only Transformer language model (chapter 9), in the style of nanoGPT's ``model.py``.

One file, read top to bottom: the configuration (:class:`GPTConfig`, whose defaults are GPT-2 small), the prefix-LM
mask (:func:`prefix_lm_mask`), the feed-forward network (:class:`MLP`), the Pre-LN block (:class:`Block`) and the
model (:class:`GPT`) with its generation loop (:meth:`GPT.generate`, with or without a KV cache) and
:meth:`GPT.from_hf`, which copies the weights of a Hugging Face ``GPT2LMHeadModel``.

What it reuses: attention is :class:`tfcourse.attention.MultiHeadAttention` (with grouped-query attention through
``n_kv_heads`` and :class:`tfcourse.attention.KVCache`), positions are
:class:`tfcourse.positional.LearnedPositionalEmbedding`, the feed-forward network is
:class:`tfcourse.layers.FeedForward`, and sampling is :func:`tfcourse.decoding.sample_next_token`.

GPT-2 keeps :math:`W^Q, W^K, W^V` fused in one ``c_attn`` (a ``Conv1D`` of width ``3 * n_embd``, whose weight is
stored transposed, ``(in, out)``, unlike ``nn.Linear``'s ``(out, in)``); here they are the three ``nn.Linear`` of
:class:`~tfcourse.attention.MultiHeadAttention`, and :meth:`GPT.from_hf` splits and transposes ``c_attn`` into them.

Shapes: ``B`` batch, ``T`` sequence length (``<= block_size``), ``C`` = ``n_embd``, ``nh`` = ``n_head``, ``hs`` =
``C / nh`` (the head size), ``V`` = ``vocab_size``, ``L`` = ``n_layer``.

Sources: Radford et al. (2018) (GPT: a decoder-only Transformer pre-trained as a language model); Radford et al.
(2019) (GPT-2: Pre-LN blocks, a final LayerNorm, residual projections initialised with std
:math:`0.02/\\sqrt{2L}`, context 1024, vocabulary 50257); Brown et al. (2020) (GPT-3); Press and Wolf (2017) (tying
the input embedding and the output layer); Raffel et al. (2020), Sec. 3.2.1, and Dong et al. (2019) (the prefix LM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import DtypeError, check_positive_int as _positive_int, check_tensor
from ..attention import KVCache, MultiHeadAttention
from ..decoding import sample_next_token
from ..layers import FeedForward
from ..positional import LearnedPositionalEmbedding
from ..scaling import count_params

if TYPE_CHECKING:  # transformers is imported only by GPT.from_hf
    from transformers import GPT2LMHeadModel

__all__ = ["GPTConfig", "prefix_lm_mask", "lm_loss", "MLP", "Block", "GPT"]

#: The activations of :class:`MLP`: GPT-2's tanh approximation of the GELU (Hugging Face's ``"gelu_new"``), the
#: exact GELU and ReLU.
GPT_ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, in nats per counted token, of ``logits`` ``(B, T, V)`` for the next tokens ``targets``
    ``(B, T)`` int64 (``-100`` marks a position not to count): the loss of :meth:`GPT.forward`.

    Raises:
        ValueError: if ``targets`` is not 2-D or its shape is not ``(B, T)``; TypeError if it is not a tensor.
    """
    B, T = logits.shape[:2]
    check_tensor("targets", targets, ndim=2, shape_hint="(B, T)")
    if tuple(targets.shape) != (B, T):
        raise ValueError(f"targets must have the shape of idx, {(B, T)}, got {tuple(targets.shape)}")
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    """The sizes of a GPT. The defaults are GPT-2 small (124 M parameters; Radford et al. 2019, Table 2, and the
    released ``gpt2`` checkpoint).

    Attributes:
        block_size: the context length, the number of learned positions (GPT-2: 1024; GPT-3: 2048).
        vocab_size: the number of tokens (GPT-2's byte-level BPE: 50257).
        n_layer: the number of blocks ``L``.
        n_head: the number of query heads ``nh``; must divide ``n_embd``.
        n_embd: the width ``C`` of the residual stream (``d_model``).
        n_kv_heads: the number of key/value heads: ``None`` (= ``n_head``, multi-head attention as in GPT-2), ``1``
            (multi-query, Shazeer 2019) or a divisor of ``n_head`` (grouped-query, Ainslie et al. 2023).
        dropout: dropout on the embeddings, the attention weights and each residual branch (GPT-2: 0.1 in
            training; 0 by default here, as nanoGPT's fine-tuning and small-data runs).
        bias: biases in the linear maps and the LayerNorms (GPT-2: ``True``; nanoGPT notes ``False`` is a bit
            better and faster).
        d_ff: the hidden width of the feed-forward network (``None``: ``4 * n_embd``, as GPT-2).
        activation: ``"gelu_tanh"`` (GPT-2's), ``"gelu"`` (exact) or ``"relu"``.
        layer_norm_eps: the ``eps`` of every LayerNorm (GPT-2: 1e-5).
        tie_weights: share the token embedding with the output layer (GPT-2 does; Press and Wolf 2017).

    Raises:
        ValueError: for non-positive sizes, ``n_embd % n_head != 0``, ``n_head % n_kv_heads != 0``, ``dropout``
            outside ``[0, 1)`` or an unknown ``activation``.
    """

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_heads: int | None = None
    dropout: float = 0.0
    bias: bool = True
    d_ff: int | None = None
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_heads is not None:
            _positive_int("n_kv_heads", self.n_kv_heads)
        if self.d_ff is not None:
            _positive_int("d_ff", self.d_ff)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_heads={self.n_kv_heads}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.activation not in GPT_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(GPT_ACTIVATIONS)}, got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    @property
    def d_head(self) -> int:
        """The head size ``hs = n_embd / n_head``."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (``n_kv_heads``, or ``n_head`` when that is ``None``)."""
        return self.n_head if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        """The feed-forward hidden width (``d_ff``, or ``4 * n_embd``)."""
        return 4 * self.n_embd if self.d_ff is None else self.d_ff

    def num_parameters(self, non_embedding: bool = False) -> int:
        r"""The number of parameters of ``GPT(self)``, counted from the sizes (no model is built).

        Per block, with :math:`C` = ``n_embd``, :math:`C_{kv} = h_{kv} \cdot hs` and :math:`F` = ``d_ff``:
        :math:`2C^2 + 2C\,C_{kv}` attention weights, :math:`2CF` feed-forward weights, and with ``bias`` the
        biases :math:`2C + 2C_{kv} + F + C` and the two LayerNorm biases; two LayerNorm gains :math:`2C`. Then the
        final LayerNorm, the token embedding :math:`VC`, the positions ``block_size`` :math:`\cdot C`, and an
        output layer :math:`VC` only if it is not tied. For GPT-2 small that is 124,439,808. The count by part is
        :func:`tfcourse.scaling.count_params`.

        Args:
            non_embedding: leave out the token and position embeddings (the count of Kaplan et al. 2020, which
                also leaves out a tied output layer, since it is the token embedding).
        """
        counts = count_params(self)
        return counts.non_embedding if non_embedding else counts.total


# --------------------------------------------------------------------------------------------------------------
# The prefix-LM mask
# --------------------------------------------------------------------------------------------------------------

def prefix_lm_mask(t_query: int, prefix_lengths: int | torch.Tensor, t_key: int | None = None, *, offset: int = 0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The prefix-LM mask: **bidirectional** attention among the first ``P`` tokens (the prefix, for example a
    prompt or an input to condition on), **causal** attention after them. ``True`` = may attend, the convention of
    :func:`tfcourse.attention.causal_mask`.

    Query ``i`` (the token at position ``offset + i``) may attend to key ``j`` if ``j <= offset + i`` (causal) or
    ``j < P`` (every token sees the whole prefix). ``P = 0`` gives the causal mask; ``P >= t_key`` gives full
    bidirectional attention (an encoder).

    Args:
        t_query: the number of queries ``Tq``.
        prefix_lengths: ``P``, an int, or a ``(B,)`` integer tensor (one prefix length per sequence).
        t_key: the number of keys ``Tk`` (default ``offset + t_query``).
        offset: the number of keys before the first query (tokens already in a KV cache).
        device: where to create the mask (default: that of ``prefix_lengths``, else the CPU).

    Returns:
        ``(B, Tq, Tk)`` bool, with ``B = 1`` for an int ``prefix_lengths``.

    Raises:
        ValueError: for non-positive lengths, a negative ``offset`` or prefix length, or a ``prefix_lengths``
            tensor that is not 1-D integer.

    Source: Raffel et al. (2020), Sec. 3.2.1 and Fig. 3 ("causal with prefix"); Dong et al. (2019), Fig. 1
    (UniLM's sequence-to-sequence mask); Liu et al. (2018) (the prefix LM of decoder-only summarisation).
    """
    _positive_int("t_query", t_query)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    t_key = offset + t_query if t_key is None else t_key
    _positive_int("t_key", t_key)
    if isinstance(prefix_lengths, torch.Tensor):
        check_tensor("prefix_lengths", prefix_lengths, ndim=1, shape_hint="(B,)")
        if prefix_lengths.is_floating_point() or prefix_lengths.is_complex() or prefix_lengths.dtype == torch.bool:
            raise DtypeError(f"prefix_lengths must have an integer dtype, got {prefix_lengths.dtype}")
        lengths = prefix_lengths.to(device) if device is not None else prefix_lengths
    elif isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        lengths = torch.tensor([prefix_lengths], device=device)
    else:
        raise TypeError(f"prefix_lengths must be an int or a (B,) integer tensor, got {type(prefix_lengths).__name__}")
    if lengths.numel() and lengths.min() < 0:
        raise ValueError(f"prefix_lengths must be non-negative, got {lengths.tolist()}")
    i = torch.arange(offset, offset + t_query, device=lengths.device)[:, None]  # (Tq, 1): absolute positions
    j = torch.arange(t_key, device=lengths.device)[None, :]                     # (1, Tk)
    return (j <= i)[None] | (j[None] < lengths[:, None, None])                  # (B, Tq, Tk)


# --------------------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------------------

class MLP(FeedForward):
    """GPT-2's feed-forward network, ``linear2(act(linear1(x)))``: a :class:`tfcourse.layers.FeedForward` (whose
    ``linear1``, ``linear2`` are Hugging Face's ``c_fc``, ``c_proj``) with a choice of
    :data:`GPT_ACTIVATIONS`, GPT-2's tanh-approximate GELU among them,
    :math:`\\tfrac12 x\\,(1 + \\tanh(\\sqrt{2/\\pi}\\,(x + 0.044715\\,x^3)))` (Hendrycks and Gimpel 2016, Sec. 2),
    which ``FeedForward`` does not offer. Dropout is not applied inside; :class:`Block` applies it to the output
    (GPT-2's ``resid_pdrop``).

    ``forward(x (B, T, C)) -> (B, T, C)``. Raises ``ValueError`` for an unknown ``activation`` or an input whose
    last dimension is not ``d_model``.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu_tanh", bias: bool = True):
        if activation not in GPT_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(GPT_ACTIVATIONS)}, got {activation!r}")
        super().__init__(d_model, d_ff, dropout=0.0, activation="gelu", bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.d_model,):
            raise ValueError(f"x: the feature size d_model must be {self.d_model}, got shape {tuple(x.shape)}")
        return self.linear2(GPT_ACTIVATIONS[self.activation](self.linear1(x)))  # (B, T, C)


class Block(nn.Module):
    r"""One GPT block, Pre-LN: :math:`x \leftarrow x + \mathrm{Attn}(\mathrm{LN}_1(x))`,
    :math:`x \leftarrow x + \mathrm{MLP}(\mathrm{LN}_2(x))`, with dropout on each branch.

    Submodules (Hugging Face's names): ``ln_1``, ``attn`` (:class:`~tfcourse.attention.MultiHeadAttention`, with
    ``n_kv_heads`` key/value heads), ``ln_2``, ``mlp`` (:class:`MLP`), ``dropout``.

    ``forward(x (B, T, C), attn_mask=None, kv_cache=None) -> (B, T, C)``: causal self-attention when ``attn_mask``
    is ``None``; otherwise ``attn_mask`` (``(B or 1, 1, T, Tk)`` bool, **``True`` = may NOT attend**, the
    convention of :class:`~tfcourse.attention.MultiHeadAttention`) is the whole mask. With a
    :class:`~tfcourse.attention.KVCache`, ``x`` holds only the new tokens.

    Source: Radford et al. (2019), Sec. 2.3 (layer normalisation moved to the input of each sub-block).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.ln_1 = nn.LayerNorm(C, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = MultiHeadAttention(C, config.n_head, dropout=config.dropout, bias=config.bias,
                                       n_kv_heads=config.n_kv_heads)
        self.ln_2 = nn.LayerNorm(C, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(C, config.hidden, config.activation, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        a, _ = self.attn(h, h, h, attn_mask=attn_mask, is_causal=attn_mask is None, kv_cache=kv_cache)
        x = x + self._dropout(a)                          # (B, T, C)
        return x + self._dropout(self.mlp(self.ln_2(x)))  # (B, T, C)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # self.dropout, not called where it would return x unchanged (eval mode, or p = 0): a generation step
        # would otherwise pay two module calls per block for nothing
        return self.dropout(x) if self.training and self.dropout.p > 0 else x


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------

class GPT(nn.Module):
    r"""A GPT language model: token and position embeddings, ``n_layer`` Pre-LN blocks with causal self-attention,
    a final LayerNorm and a linear map to the vocabulary (tied to the token embedding).

    .. math:: h_0 = W_e[x] + W_p[0..T-1], \qquad h_l = \mathrm{Block}_l(h_{l-1}), \qquad
              p(x_{t+1} \mid x_{\le t}) = \mathrm{softmax}(\mathrm{LN}(h_L)_t\, W_e^\top)

    Args:
        config: a :class:`GPTConfig`.

    Submodules (Hugging Face's ``GPT2LMHeadModel`` names): ``wte`` (``nn.Embedding(V, C)``), ``wpe``
    (:class:`~tfcourse.positional.LearnedPositionalEmbedding`, ``(block_size, C)``), ``drop``, ``h`` (the blocks),
    ``ln_f``, ``lm_head`` (``nn.Linear(C, V, bias=False)``, whose weight **is** ``wte.weight`` when tied).
    Initialisation as GPT-2: normal with std 0.02, biases 0, and std :math:`0.02/\sqrt{2L}` for the two
    projections that write into the residual stream (``attn.W_o``, ``mlp.linear2``), so that the stream's variance
    does not grow with depth.

    ``forward(idx, targets=None, *, prefix_lengths=None, kv_caches=None) -> (logits, loss)``:

    * ``idx``: ``(B, T)`` int64 token ids in ``[0, V)``; with ``kv_caches``, the new tokens only, and
      ``len(cache) + T <= block_size``;
    * ``targets``: optional ``(B, T)`` int64, the next tokens; ``-100`` marks a position not to count. ``loss`` is
      the mean cross-entropy in nats per counted token (``None`` without targets);
    * ``prefix_lengths``: optional int or ``(B,)`` int tensor: the prefix-LM mask of :func:`prefix_lm_mask`
      (bidirectional over the first ``P`` tokens) instead of the causal mask;
    * ``kv_caches``: optional list of ``n_layer`` :class:`~tfcourse.attention.KVCache` (:meth:`new_kv_caches`),
      updated in place: the new tokens get positions ``len(cache) ..`` and attend to the cached ones;
    * ``logits``: ``(B, T, V)`` floating, in the model's dtype.

    Raises:
        ValueError: (or :class:`~tfcourse._checks.DtypeError`, also a ``TypeError``) for an ``idx`` that is not a
            2-D integer tensor of ids in ``[0, V)``, a sequence longer than ``block_size``, ``targets`` of
            another shape, or a list of caches of the wrong length.
        TypeError: if ``idx`` is not a tensor or a cache is not a :class:`~tfcourse.attention.KVCache`.

    Sources: Radford et al. (2018, 2019); nanoGPT (Karpathy) for the layout of this file.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix, V x C: the embedding is the output layer
        self.apply(self._init_weights)
        for block in self.h:  # GPT-2's scaled initialisation of the projections into the residual stream
            for proj in (block.attn.W_o, block.mlp.linear2):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, LearnedPositionalEmbedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_kv_caches(self) -> list[KVCache]:
        """``n_layer`` empty :class:`~tfcourse.attention.KVCache`, one per block, for ``forward(kv_caches=...)``."""
        return [KVCache() for _ in self.h]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                prefix_lengths: int | torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = self._check_idx(idx)
        offset = self._check_caches(kv_caches)
        if offset + T > self.config.block_size:
            raise ValueError(f"idx: {offset} cached + {T} new tokens exceed block_size={self.config.block_size} "
                             f"(the model has no position embedding beyond it)")
        pos_emb = self.wpe.encoding(offset + T)[offset:]                     # (T, C): positions offset .. offset+T-1
        x = self.wte(idx) + pos_emb                                          # (B, T, C)
        if self.training and self.drop.p > 0:                                # (a no-op otherwise: not called)
            x = self.drop(x)
        mask = None
        if prefix_lengths is not None:
            if isinstance(prefix_lengths, torch.Tensor) and prefix_lengths.shape not in ((B,), (1,)):
                raise ValueError(f"prefix_lengths must be an int or have shape (B,) = ({B},), got "
                                 f"{tuple(prefix_lengths.shape)}")
            allowed = prefix_lm_mask(T, prefix_lengths, offset + T, offset=offset, device=idx.device)  # (B|1, T, Tk)
            mask = ~allowed[:, None]  # (B|1, 1, T, Tk): MultiHeadAttention's bool mask is True = may NOT attend
        for block, cache in zip(self.h, kv_caches if kv_caches is not None else [None] * len(self.h)):
            x = block(x, attn_mask=mask, kv_cache=cache)                    # (B, T, C)
        logits = self.lm_head(self.ln_f(x))                                  # (B, T, V)
        return logits, None if targets is None else lm_loss(logits, targets)

    def _check_idx(self, idx: object) -> tuple[int, int]:
        check_tensor("idx", idx, ndim=2, shape_hint="(B, T) token ids")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise DtypeError(f"idx must hold integer token ids, got {idx.dtype}")
        B, T = idx.shape
        if B == 0 or T == 0:
            raise ValueError(f"idx must hold at least one token per sequence and one sequence, got {tuple(idx.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(idx))  # one pass, no tensor comparisons (this runs every step)
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"idx: token ids must lie in [0, vocab_size={self.config.vocab_size}), got values from "
                             f"{lo} to {hi}")
        return B, T

    def _check_caches(self, kv_caches: object) -> int:
        if kv_caches is None:
            return 0
        if not isinstance(kv_caches, (list, tuple)) or len(kv_caches) != len(self.h):
            raise ValueError(f"kv_caches must be a list of n_layer={len(self.h)} KVCache (model.new_kv_caches())")
        for cache in kv_caches:
            if not isinstance(cache, KVCache):
                raise TypeError(f"kv_caches must hold KVCache objects, got {type(cache).__name__}")
        lengths = {len(cache) for cache in kv_caches}
        if len(lengths) != 1:
            raise ValueError(f"kv_caches: every layer's cache must hold as many tokens, got lengths {sorted(lengths)}")
        return lengths.pop()

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, *, generator: torch.Generator | None = None,
                 prefix_lengths: int | torch.Tensor | None = None) -> torch.Tensor:
        """Continue each sequence of ``idx`` by ``max_new_tokens`` tokens, one at a time, each drawn from the
        model's next-token distribution by :func:`tfcourse.decoding.sample_next_token`.

        Call ``model.eval()`` first (dropout would make the samples noisier, and the cache would no longer match
        recomputation).

        **The KV cache.** With ``use_cache=True`` the prompt is run once, filling one
        :class:`~tfcourse.attention.KVCache` per block; every further step runs only the newest token, whose query
        attends to the cached keys and values. Without it, every step runs the whole context again. Both give the
        same tokens. When the context reaches ``block_size`` it is cropped to the last ``block_size`` tokens (as
        nanoGPT does); every token then moves to another learned position, so the cached keys are no longer valid
        and the cache is rebuilt from the cropped context at every further step (as costly as no cache).

        Args:
            idx: ``(B, T)`` int64 prompt (at least one token per sequence; all of the same length).
            max_new_tokens: the number of tokens to add (``>= 0``).
            temperature: divides the logits; ``0`` means greedy decoding (argmax).
            top_k: keep the ``top_k`` most probable tokens (:func:`tfcourse.decoding.top_k_filter`).
            top_p: keep the nucleus of mass ``top_p`` (:func:`tfcourse.decoding.top_p_filter`).
            use_cache: use the KV cache.
            generator: a seeded ``torch.Generator`` for reproducible samples.
            prefix_lengths: generate as a prefix LM: the first ``P`` prompt tokens attend to each other both ways
                (``P`` at most the prompt length; the context may then not exceed ``block_size``).

        Returns:
            ``(B, T + max_new_tokens)`` int64: the prompt followed by the new tokens.

        Raises:
            ValueError: for a bad prompt (as ``forward``), a negative ``max_new_tokens``, bad sampling settings
                (as :func:`~tfcourse.decoding.sample_next_token`), or a prefix longer than the prompt or with a
                context that would exceed ``block_size``.
        """
        self._check_idx(idx)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        block_size = self.config.block_size
        if prefix_lengths is not None:
            longest = int(prefix_lengths.max()) if isinstance(prefix_lengths, torch.Tensor) else prefix_lengths
            if isinstance(longest, int) and longest > idx.shape[1]:
                raise ValueError(f"prefix_lengths: a prefix ({longest}) may not be longer than the prompt "
                                 f"({idx.shape[1]}), or the new tokens would change the prefix's representations")
            if idx.shape[1] + max_new_tokens > block_size:
                raise ValueError(f"prefix-LM generation needs the whole context in one window: prompt "
                                 f"{idx.shape[1]} + max_new_tokens {max_new_tokens} > block_size {block_size}")
        # Inference mode (no autograd bookkeeping at all) makes each small step cheaper than no_grad alone; the result
        # is cloned outside it, so that it is an ordinary tensor (one that training code may use).
        with torch.inference_mode():
            caches = self.new_kv_caches() if use_cache else None
            for _ in range(max_new_tokens):
                if use_cache and 0 < len(caches[0]) < block_size:
                    logits, _ = self(idx[:, -1:], kv_caches=caches)                 # only the newest token
                else:
                    if use_cache:  # the first step, or a full window that must slide: (re)fill the cache
                        caches = self.new_kv_caches()
                    logits, _ = self(idx[:, -block_size:], prefix_lengths=prefix_lengths, kv_caches=caches)
                next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator=generator)  # (B,)
                idx = torch.cat([idx, next_token[:, None]], dim=1)                    # (B, T + 1)
        return idx.clone()

    @classmethod
    def from_hf(cls, module: GPT2LMHeadModel) -> GPT:
        """A :class:`GPT` with the weights (copies), sizes, dtype, device and training mode of a Hugging Face
        ``transformers.GPT2LMHeadModel``.

        ``c_attn`` (``Conv1D``, weight ``(C, 3C)`` = ``[W_q | W_k | W_v]`` stored as ``(in, out)``) is split into
        ``attn.W_q``, ``attn.W_k``, ``attn.W_v`` and transposed; ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``
        are transposed into ``attn.W_o``, ``mlp.linear1`` and ``mlp.linear2``. An untied ``lm_head`` is copied.

        Raises:
            TypeError: if ``module`` is not a ``GPT2LMHeadModel``.
            ValueError: for a configuration this model does not implement (cross-attention,
                ``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``, an activation other than
                ``gelu_new``/``gelu``/``relu``, or different dropout rates for embeddings, attention and residuals).
        """
        from transformers import GPT2LMHeadModel

        if not isinstance(module, GPT2LMHeadModel):
            raise TypeError(f"module must be a transformers.GPT2LMHeadModel, got {type(module).__name__}")
        hf = module.config
        if hf.add_cross_attention:
            raise ValueError("module: add_cross_attention=True is not supported (a GPT has no encoder)")
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
            raise ValueError("module: only scale_attn_weights=True and scale_attn_by_inverse_layer_idx=False (the "
                             "1/sqrt(hs) scaling of GPT-2) are supported")
        if hf.activation_function not in _HF_ACTIVATIONS:
            raise ValueError(f"module: activation_function must be one of {sorted(_HF_ACTIVATIONS)}, got "
                             f"{hf.activation_function!r}")
        if len({hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop}) != 1:
            raise ValueError("module: resid_pdrop, embd_pdrop and attn_pdrop must be equal (one dropout rate here)")
        transformer = module.transformer
        tied = module.lm_head.weight is transformer.wte.weight
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, dropout=float(hf.resid_pdrop), bias=True,
                           d_ff=hf.n_inner, activation=_HF_ACTIVATIONS[hf.activation_function],
                           layer_norm_eps=hf.layer_norm_epsilon, tie_weights=tied)
        weight = transformer.wte.weight
        with torch.device("meta"):
            ours = cls(config)
        ours = ours.to_empty(device=weight.device).to(weight.dtype)
        if tied:
            ours.lm_head.weight = ours.wte.weight  # to_empty keeps the tie only by identity: set it again
        C = config.n_embd
        with torch.no_grad():
            ours.wte.weight.copy_(transformer.wte.weight)
            ours.wpe.weight.copy_(transformer.wpe.weight)
            for mine, theirs in zip(ours.h, transformer.h):
                _copy_norm(mine.ln_1, theirs.ln_1)
                _copy_norm(mine.ln_2, theirs.ln_2)
                w_q, w_k, w_v = theirs.attn.c_attn.weight.split(C, dim=1)  # (C, C) each, (in, out)
                b_q, b_k, b_v = theirs.attn.c_attn.bias.split(C)
                for linear, w, b in ((mine.attn.W_q, w_q, b_q), (mine.attn.W_k, w_k, b_k),
                                     (mine.attn.W_v, w_v, b_v)):
                    linear.weight.copy_(w.T)
                    linear.bias.copy_(b)
                _copy_conv1d(mine.attn.W_o, theirs.attn.c_proj)
                _copy_conv1d(mine.mlp.linear1, theirs.mlp.c_fc)
                _copy_conv1d(mine.mlp.linear2, theirs.mlp.c_proj)
            _copy_norm(ours.ln_f, transformer.ln_f)
            if not tied:
                ours.lm_head.weight.copy_(module.lm_head.weight)
        return ours.train(module.training)


def _copy_norm(ours: nn.LayerNorm, theirs: nn.LayerNorm) -> None:
    ours.weight.copy_(theirs.weight)
    if ours.bias is not None:
        ours.bias.copy_(theirs.bias)


def _copy_conv1d(ours: nn.Linear, theirs: nn.Module) -> None:
    """Hugging Face's ``Conv1D`` computes ``x @ W + b`` with ``W`` ``(in, out)``; ``nn.Linear`` holds ``W.T``."""
    ours.weight.copy_(theirs.weight.T)
    ours.bias.copy_(theirs.bias)
