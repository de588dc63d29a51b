r"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters and soft prompt tuning (chapter 10).

Each method freezes the pre-trained weights and trains a small number of new parameters:

* :class:`LoRALinear` adds a trainable low-rank update :math:`\frac{\alpha}{r} B A` to a frozen ``nn.Linear``
  (Hu et al., 2021, Eq. 3), which can be merged into the weight for inference (:meth:`LoRALinear.merge`) and taken
  out again (:meth:`LoRALinear.unmerge`); :func:`apply_lora` puts it on the named linear layers of a model.
* :class:`Adapter` is the bottleneck of Houlsby et al. (2019), :math:`h + W_\text{up}\,\phi(W_\text{down} h)`,
  identity at initialisation; :func:`add_adapters` inserts two per block of a :class:`~tfcourse.models.gpt.GPT`.
* :class:`PromptTunedGPT` prepends ``n_virtual`` trainable input embeddings to a frozen GPT (Lester et al., 2021).

:func:`count_parameters` gives the trainable and total parameter counts that compare them. The LoRA layer is
tested equal to Hugging Face ``peft``'s (``tests/test_peft.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_tensor
from .models.gpt import lm_loss

__all__ = ["Adapter", "AdapterAfter", "LoRALinear", "PromptTunedGPT", "add_adapters", "apply_lora",
           "count_parameters", "freeze"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad = False`` on every parameter of ``model`` (in place); returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters of ``model``, each shared (tied) tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


# --------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update (LoRA).

    .. math:: h = W_0 x + b + \frac{\alpha}{r} B A\, \mathrm{dropout}(x), \qquad
              A \in \mathbb R^{r \times d_\text{in}},\; B \in \mathbb R^{d_\text{out} \times r}

    ``A`` is initialised as ``nn.Linear``'s weights (Kaiming uniform, :math:`a = \sqrt 5`), ``B`` with zeros, so
    the layer starts equal to ``base`` (Hu et al., 2021, Sec. 4.1; the initialisation of Hugging Face ``peft``).
    Only ``lora_A`` and ``lora_B`` are trainable; ``base``'s weight and bias are frozen.

    Args:
        base: the pre-trained ``nn.Linear(d_in, d_out)``; it is wrapped, not copied.
        r: rank of the update, a positive int.
        alpha: scale numerator (``alpha / r`` multiplies ``B A``); default ``r`` (scale 1).
        dropout: dropout probability on the input of the low-rank path only, in ``[0, 1)``.

    ``forward(x (..., d_in)) -> (..., d_out)``, in ``base``'s dtype.

    :meth:`merge` adds :math:`\frac{\alpha}{r} B A` into ``base.weight`` (inference at no extra cost; the low-rank
    path is then skipped); :meth:`unmerge` subtracts it again. Training a merged layer is refused.

    Raises:
        TypeError: if ``base`` is not an ``nn.Linear`` or ``r`` is not an int.
        ValueError: for ``r <= 0``, ``r > min(d_in, d_out)``, ``alpha <= 0`` or ``dropout`` outside ``[0, 1)``;
            in ``forward``, for an input whose last dimension is not ``d_in``, or when training while merged.

    Source: Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models", Eq. (3) and Sec. 4.1-4.2.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        _positive_int("r", r)
        if r > min(base.in_features, base.out_features):
            raise ValueError(f"r must be at most min(d_in, d_out) = {min(base.in_features, base.out_features)} "
                             f"for a low-rank update, got {r}")
        alpha = float(r if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        freeze(base)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``(d_out, d_in)`` (with the update in it when merged), so that code reading a
        linear layer's ``weight`` (its dtype, device or shape) works on a :class:`LoRALinear` too."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias ``(d_out,)`` or ``None``."""
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        r"""The update :math:`\frac{\alpha}{r} B A`, ``(d_out, d_in)``, of rank at most ``r``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1, shape_hint="(..., d_in)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., d_in) = (..., {self.in_features}), got {tuple(x.shape)}")
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise ValueError("this LoRALinear is merged: unmerge() it before training")
            return self.base(x)
        return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> LoRALinear:
        """Add the update into ``base.weight`` (in place); returns ``self``. A no-op when already merged."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> LoRALinear:
        """Subtract the update from ``base.weight`` again (in place); returns ``self``. A no-op when not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


def apply_lora(model: nn.Module, target_modules: tuple[str, ...] | list[str] = ("W_q", "W_v"), r: int = 8,
               alpha: float | None = None, dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and replace each ``nn.Linear`` whose attribute name is in ``target_modules`` by a
    :class:`LoRALinear` around it (in place).

    The default, the query and value projections of every attention layer, is the choice of Hu et al. (2021),
    Sec. 7.1. Names are matched against the last part of each module's dotted name (``"h.0.attn.W_q"`` matches
    ``"W_q"``).

    Returns:
        The dotted names of the replaced layers, in order.

    Raises:
        ValueError: if ``target_modules`` is empty or matches no ``nn.Linear`` of ``model``.
        TypeError, ValueError: as :class:`LoRALinear` for ``r``, ``alpha`` and ``dropout``.
    """
    targets = set(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one linear layer")
    freeze(model)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {sorted(targets)} match no nn.Linear of the model; its linear layers "
                         f"are named {names}")
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(module, r, alpha, dropout))
    return [name for name, _ in found]


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------

class Adapter(nn.Module):
    r"""The bottleneck adapter of Houlsby et al. (2019), Sec. 2.1 and Fig. 2:

    .. math:: \mathrm{Adapter}(h) = h + W_\text{up}\, \mathrm{GELU}(W_\text{down} h + b_\text{down}) + b_\text{up}

    with :math:`W_\text{down} \in \mathbb R^{m \times d}` and :math:`W_\text{up} \in \mathbb R^{d \times m}`,
    :math:`m \ll d`. ``up`` starts at zero, so the adapter starts as the identity ("near-identity initialisation").

    Args:
        d_model: feature size ``d`` of ``h``.
        bottleneck: the bottleneck size ``m``, a positive int.

    ``forward(h (..., d_model)) -> (..., d_model)``.

    Raises:
        TypeError, ValueError: for a ``d_model`` or ``bottleneck`` that is not a positive int; in ``forward``,
            for an input whose last dimension is not ``d_model``.
    """

    def __init__(self, d_model: int, bottleneck: int):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("bottleneck", bottleneck)
        self.d_model = d_model
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        check_tensor("h", h, min_ndim=1, shape_hint="(..., d_model)")
        if h.shape[-1] != self.d_model:
            raise ValueError(f"h must have shape (..., d_model) = (..., {self.d_model}), got {tuple(h.shape)}")
        return h + self.up(F.gelu(self.down(h)))


class AdapterAfter(nn.Module):
    """``adapter(module(x))``: a frozen sublayer followed by a trainable :class:`Adapter`, before the residual
    addition (Houlsby et al., 2019, Fig. 2). ``forward(x) -> module(x)`` passed through the adapter."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.module(x))


def add_adapters(gpt: nn.Module, bottleneck: int) -> list[Adapter]:
    """Freeze a :class:`~tfcourse.models.gpt.GPT` and insert two :class:`Adapter` per block (in place): after the
    attention's output projection ``attn.W_o`` and after the feed-forward network ``mlp``, each before its
    residual addition, as Houlsby et al. (2019) place them. The block's LayerNorms stay frozen here (Houlsby et al.
    also train them; :func:`count_parameters` then counts a little more).

    Returns:
        The new adapters (trainable), two per block.

    Raises:
        TypeError: if ``gpt`` has no GPT blocks (``gpt.h``) or ``bottleneck`` is not an int.
        ValueError: if ``bottleneck`` is not positive.
    """
    blocks = getattr(gpt, "h", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks):
        raise TypeError(f"gpt must be a tfcourse GPT (blocks in gpt.h), got {type(gpt).__name__}")
    _positive_int("bottleneck", bottleneck)
    freeze(gpt)
    d_model = gpt.config.n_embd
    adapters = []
    for block in blocks:
        device, dtype = block.attn.W_o.weight.device, block.attn.W_o.weight.dtype
        after_attn, after_mlp = (Adapter(d_model, bottleneck).to(device, dtype) for _ in range(2))
        block.attn.W_o = AdapterAfter(block.attn.W_o, after_attn)
        block.mlp = AdapterAfter(block.mlp, after_mlp)
        adapters += [after_attn, after_mlp]
    return adapters


# --------------------------------------------------------------------------------------------------------------
# Prompt tuning
# --------------------------------------------------------------------------------------------------------------

class PromptTunedGPT(nn.Module):
    r"""A frozen :class:`~tfcourse.models.gpt.GPT` with ``n_virtual`` trainable input vectors in front of every
    sequence: soft prompt tuning (Lester et al., 2021, Sec. 2).

    The prompt :math:`P_e \in \mathbb R^{n \times C}` takes positions :math:`0..n-1` (it gets the position
    embeddings like any token), the tokens positions :math:`n..n+T-1`; causal attention lets every token attend
    to the whole prompt. The prompt is initialised with the embeddings of ``init_ids`` (Lester et al.'s
    initialisation from vocabulary), or of random vocabulary tokens.

    Args:
        gpt: the pre-trained model; it is frozen (in place) and shared, not copied.
        n_virtual: number of prompt vectors ``n``.
        init_ids: optional ``(n,)`` int64 token ids whose embeddings initialise the prompt.
        generator: optional ``torch.Generator`` for the random initial tokens.

    ``forward(idx (B, T) int64, targets=None) -> (logits (B, T, V), loss)``: logits for the real tokens only,
    ``loss`` as :meth:`GPT.forward <tfcourse.models.gpt.GPT.forward>` (mean cross-entropy in nats, ``-100``
    ignored).

    Raises:
        TypeError: if ``gpt`` is not a GPT or ``n_virtual`` is not an int.
        ValueError: for ``n_virtual <= 0``, ``init_ids`` of another shape, or ``n + T > block_size``.
    """

    def __init__(self, gpt: nn.Module, n_virtual: int, init_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not all(hasattr(gpt, a) for a in ("wte", "wpe", "h", "ln_f", "lm_head", "config")):
            raise TypeError(f"gpt must be a tfcourse GPT, got {type(gpt).__name__}")
        _positive_int("n_virtual", n_virtual)
        if n_virtual >= gpt.config.block_size:
            raise ValueError(f"n_virtual must leave room for tokens in block_size={gpt.config.block_size}, "
                             f"got {n_virtual}")
        self.gpt = freeze(gpt)
        if init_ids is None:
            init_ids = torch.randint(gpt.config.vocab_size, (n_virtual,), generator=generator)
        check_tensor("init_ids", init_ids, ndim=1, shape_hint="(n_virtual,)")
        if tuple(init_ids.shape) != (n_virtual,):
            raise ValueError(f"init_ids must have shape (n_virtual,) = ({n_virtual},), got {tuple(init_ids.shape)}")
        self.n_virtual = n_virtual
        self.prompt = nn.Parameter(gpt.wte.weight[init_ids.to(gpt.wte.weight.device)].detach().clone())  # (n, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        gpt, n = self.gpt, self.n_virtual
        B, T = gpt._check_idx(idx)
        if n + T > gpt.config.block_size:
            raise ValueError(f"idx: {n} prompt vectors + {T} tokens exceed block_size={gpt.config.block_size}")
        x = torch.cat([self.prompt.expand(B, n, -1), gpt.wte(idx)], dim=1)          # (B, n + T, C)
        x = gpt.drop(gpt.wpe(x, torch.arange(n + T, device=idx.device)))
        for block in gpt.h:
            x = block(x)                                                              # causal
        logits = gpt.lm_head(gpt.ln_f(x[:, n:]))                                     # (B, T, V)
        return logits, None if targets is None else lm_loss(logits, targets)
