r"""Pre-training objectives of encoder-decoder models: T5's span corruption and BART's text infilling (chapter 10).

* :func:`random_spans_noise_mask` chooses which tokens to corrupt as T5 does: exactly
  ``round(length * noise_density)`` noise tokens in ``round(num_noise / mean_span_length)`` spans, the noise and
  the kept spans alternating, each set of span lengths a uniformly random composition (Raffel et al., 2020,
  Sec. 3.3.4 and the ``random_spans_noise_mask`` of the T5 code base).
* :func:`span_corrupt` turns a sequence and that mask into T5's input (each noise span replaced by one sentinel,
  the sentinels numbered in order) and target (each sentinel followed by the span it replaced, then a final
  sentinel) (Raffel et al., 2020, Sec. 3.1.4 and Fig. 2).
* :func:`text_infill` is BART's text infilling: span lengths drawn from Poisson(3) until 30% of the tokens are
  covered, each span (a 0-length one too) replaced by a single mask token; the target is the original sequence
  (Lewis et al., 2020, Sec. 2.2).

Sequences are 1-D int64 tensors of token ids; sentinels and the mask are ids the caller reserves.
"""

from __future__ import annotations

import torch

from .._checks import check_tensor

__all__ = ["random_spans_noise_mask", "span_corrupt", "text_infill"]


def _composition(total: int, parts: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random way to write ``total`` as an ordered sum of ``parts`` positive ints, ``(parts,)``."""
    cuts = torch.randperm(total - 1, generator=generator)[:parts - 1].sort().values + 1   # distinct in 1..total-1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    return edges.diff()


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of ``length`` tokens T5's span corruption replaces.

    Args:
        length: number of tokens, at least 2.
        noise_density: fraction of the tokens to corrupt, in ``(0, 1)``; T5 uses 0.15.
        mean_span_length: mean length of a corrupted span, at least 1; T5 uses 3.
        generator: optional ``torch.Generator`` for reproducibility.

    Returns:
        ``(length,)`` bool, ``True`` = noise. It has exactly ``num_noise = min(max(round(length * noise_density),
        1), length - 1)`` noise tokens in exactly ``num_spans = max(round(num_noise / mean_span_length), 1)``
        runs, and never starts with noise (T5's convention: the kept span comes first).

    Raises:
        ValueError: for a ``length`` below 2, a ``noise_density`` outside ``(0, 1)`` or a ``mean_span_length``
            below 1.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_span_length >= 1.0:
        raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)  # each span and each gap needs one token
    noise_lengths = _composition(num_noise, num_spans, generator)             # (num_spans,)
    kept_lengths = _composition(length - num_noise, num_spans, generator)     # (num_spans,)
    runs = torch.stack([kept_lengths, noise_lengths], dim=1).flatten()        # kept, noise, kept, noise, ...
    is_noise = torch.arange(2 * num_spans) % 2 == 1
    return torch.repeat_interleave(is_noise, runs)


def span_corrupt(tokens: torch.Tensor, noise_mask: torch.Tensor, sentinel_ids: list[int] | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's span corruption of one sequence.

    Args:
        tokens: ``(T,)`` int64 token ids.
        noise_mask: ``(T,)`` bool, ``True`` = corrupted (:func:`random_spans_noise_mask`).
        sentinel_ids: ids of the sentinels ``<extra_id_0>, <extra_id_1>, ...``, at least one more than the number
            of noise spans.

    Returns:
        ``(inputs, targets)``, 1-D int64: ``inputs`` is ``tokens`` with each noise span replaced by the next
        sentinel; ``targets`` is, for each span, its sentinel followed by the span's tokens, and one final
        sentinel. Example (Raffel et al., 2020, Fig. 2): "Thank you for inviting me to your party last week" ->
        ``"Thank you <X> me to your party <Y> week"`` and ``"<X> for inviting <Y> last <Z>"``.

    Raises:
        ValueError: for tensors of other shapes or too few sentinels; TypeError for a non-bool ``noise_mask``.
    """
    check_tensor("tokens", tokens, ndim=1, shape_hint="(T,) token ids")
    check_tensor("noise_mask", noise_mask, ndim=1, shape_hint="(T,) bool")
    if noise_mask.dtype != torch.bool:
        raise TypeError(f"noise_mask must be bool, got {noise_mask.dtype}")
    if noise_mask.shape != tokens.shape:
        raise ValueError(f"noise_mask must have the shape of tokens, {tuple(tokens.shape)}, got "
                         f"{tuple(noise_mask.shape)}")
    sentinels = torch.as_tensor(sentinel_ids, dtype=tokens.dtype)
    starts = noise_mask & ~torch.cat([torch.tensor([False]), noise_mask[:-1]])    # first token of each noise span
    num_spans = int(starts.sum())
    if sentinels.numel() < num_spans + 1:
        raise ValueError(f"sentinel_ids: {num_spans} noise spans need {num_spans + 1} sentinels, got "
                         f"{sentinels.numel()}")
    span_index = starts.cumsum(0) - 1                                            # span of each noise token
    inputs, targets = [], []
    for t in range(tokens.numel()):
        if not noise_mask[t]:
            inputs.append(tokens[t])
            continue
        if starts[t]:
            inputs.append(sentinels[span_index[t]])
            targets.append(sentinels[span_index[t]])
        targets.append(tokens[t])
    targets.append(sentinels[num_spans])
    return torch.stack(inputs), torch.stack(targets)


def text_infill(tokens: torch.Tensor, mask_id: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BART's text infilling of one sequence: the model must also infer *how many* tokens each mask hides.

    Spans are drawn one at a time, a length from Poisson(``poisson_lambda``) and a random start, until
    ``round(mask_ratio * T)`` tokens are covered; each span becomes one ``mask_id`` (a 0-length span inserts a
    mask between two tokens). Spans neither overlap nor touch (a draw that would is redrawn; after 100 failed draws in a
    row it stops).

    Args:
        tokens: ``(T,)`` int64 token ids.
        mask_id: id of the ``<mask>`` token.
        mask_ratio: fraction of the tokens to cover, in ``[0, 1)``; BART uses 0.3.
        poisson_lambda: mean span length; BART uses 3.
        generator: optional ``torch.Generator``.

    Returns:
        ``(inputs, targets)``: the corrupted sequence and ``tokens`` itself (BART reconstructs the whole input).

    Raises:
        ValueError: for a ``tokens`` that is not 1-D, a ``mask_ratio`` outside ``[0, 1)`` or a non-positive
            ``poisson_lambda``.
    """
    check_tensor("tokens", tokens, ndim=1, shape_hint="(T,) token ids")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not poisson_lambda > 0:
        raise ValueError(f"poisson_lambda must be positive, got {poisson_lambda}")
    T = tokens.numel()
    budget = round(mask_ratio * T)
    covered = torch.zeros(T, dtype=torch.bool)          # tokens removed
    inserted = torch.zeros(T + 1, dtype=torch.bool)     # a 0-length span: a mask inserted before token t
    failures = 0
    while int(covered.sum()) < budget and failures < 100:
        length = int(torch.poisson(torch.tensor([poisson_lambda]), generator=generator).item())
        length = min(length, budget - int(covered.sum()))
        start = int(torch.randint(T - length + 1, (1,), generator=generator).item())
        # a span may not overlap or touch another (two masks side by side would merge into one)
        lo, hi = max(start - 1, 0), start + length + 1
        if covered[lo:hi].any() or inserted[lo:min(hi, T + 1)].any():
            failures += 1
            continue
        failures = 0
        if length == 0:
            inserted[start] = True
        else:
            covered[start:start + length] = True
    mask = torch.tensor(mask_id, dtype=tokens.dtype)
    inputs = []
    for t in range(T + 1):
        if inserted[t] or (t < T and covered[t] and (t == 0 or not covered[t - 1])):
            inputs.append(mask)
        if t < T and not covered[t]:
            inputs.append(tokens[t])
    return torch.stack(inputs), tokens.clone()
