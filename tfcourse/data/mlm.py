"""BERT's pre-training data (chapter 8): masked language modelling with the 15% rule, next-sentence prediction
pairs, and padded batches of a WordPiece tokenizer's encodings.

* :func:`mask_tokens`: choose 15% of the (non-special) tokens as prediction targets; replace 80% of those by
  ``[MASK]``, 10% by a random token, and keep 10% unchanged (Devlin et al. 2019, Sec. 3.1 and Appendix C.2).
  Returns the corrupted ids, the labels (``-100`` where there is nothing to predict) and what happened at each
  position (:data:`NOT_SELECTED`, :data:`MASKED`, :data:`RANDOM`, :data:`KEPT`).
* :func:`nsp_pairs`: (A, B, label) pairs in which B follows A half of the time and is a random segment of another
  document otherwise (Sec. 3.1, Task #2). Labels as Hugging Face's: **0 = IsNext**, **1 = NotNext**.
* :func:`encode_batch`: ``[CLS] A [SEP] (B [SEP])`` encodings of a ``tokenizers.Tokenizer``, truncated and padded
  into a :class:`BERTBatch` (``input_ids``, ``token_type_ids``, ``key_padding_mask`` with ``True`` at padding).

Everything random takes a ``torch.Generator``: the same seed gives the same masks and pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from .._checks import DtypeError, check_tensor

__all__ = ["IGNORE_INDEX", "NOT_SELECTED", "MASKED", "RANDOM", "KEPT", "MaskedTokens", "special_tokens_mask",
           "mask_tokens", "NSPPair", "nsp_pairs", "BERTBatch", "pack_batch", "encode_batch"]

#: The label of a position with nothing to predict (PyTorch's ``ignore_index``, Hugging Face's too).
IGNORE_INDEX = -100

#: What :func:`mask_tokens` did at a position (its ``kind`` tensor).
NOT_SELECTED, MASKED, RANDOM, KEPT = 0, 1, 2, 3


class MaskedTokens(NamedTuple):
    """The output of :func:`mask_tokens`, three ``(B, T)`` tensors.

    * ``input_ids``: the corrupted ids the model reads (``torch.long``);
    * ``labels``: the original id at each selected position, :data:`IGNORE_INDEX` (-100) elsewhere;
    * ``kind``: ``torch.uint8``, :data:`NOT_SELECTED` (0), :data:`MASKED` (1, now ``[MASK]``), :data:`RANDOM`
      (2, now a random token, which may by chance be the original one) or :data:`KEPT` (3, unchanged).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    kind: torch.Tensor


def _check_ids(name: str, ids: object) -> torch.Tensor:
    check_tensor(name, ids, min_ndim=1, shape_hint="(B, T)")
    if ids.dtype != torch.long:
        raise DtypeError(f"{name} must hold int64 (torch.long) token ids, got {ids.dtype}")
    return ids


def _check_fraction(name: str, value: object, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0
    if not ok or (positive and value == 0):
        raise ValueError(f"{name} must be a number in {'(0' if positive else '[0'}, 1], got {value!r}")
    return float(value)


def special_tokens_mask(input_ids: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """``True`` where ``input_ids`` holds one of ``special_ids`` (same shape, bool).

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) if ``input_ids`` is not a ``torch.long``
            tensor or ``special_ids`` holds something other than ints.
    """
    _check_ids("input_ids", input_ids)
    special_ids = list(special_ids)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in special_ids):
        raise ValueError(f"special_ids must be ints, got {special_ids!r}")
    specials = torch.tensor(special_ids, dtype=torch.long, device=input_ids.device)
    return torch.isin(input_ids, specials)


def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, mask_id: int, special_ids: Iterable[int] = (),
                key_padding_mask: torch.Tensor | None = None, mlm_probability: float = 0.15,
                mask_fraction: float = 0.8, random_fraction: float = 0.1,
                generator: torch.Generator | None = None) -> MaskedTokens:
    r"""BERT's masking: select 15% of the tokens as targets, then corrupt them by the 80/10/10 rule.

    1. Every position that is neither a special token (``special_ids``, e.g. ``[CLS] [SEP] [PAD] [MASK]
       [UNK]``) nor padding (``key_padding_mask``) is **selected**, independently, with probability
       ``mlm_probability`` (:math:`p = 0.15`): its label is its original id.
    2. A selected position becomes ``[MASK]`` with probability ``mask_fraction`` (0.8), a **random** token with
       probability ``random_fraction`` (0.1), and stays **unchanged** otherwise (0.1). The random token is drawn
       uniformly from the non-special ids ``[0, vocab_size)`` (so it can, with probability
       :math:`1 / (V - |\text{specials}|)`, be the original token).

    Why not always ``[MASK]``? ``[MASK]`` never occurs when the model is fine-tuned or used; if only masked
    positions had targets, the model would need a good representation only of ``[MASK]`` positions. Random and
    unchanged tokens make every input token possibly a target, so the model must represent each one in context,
    and the unchanged 10% keeps the representation close to the observed word (Devlin et al. 2019, Appendix C.2).

    Selection is per token (Bernoulli), as in Hugging Face's ``DataCollatorForLanguageModeling`` and RoBERTa's
    dynamic masking; BERT's original data script chose exactly ``round(0.15 n)`` positions of each sequence.
    Hugging Face draws random tokens from the whole vocabulary, special tokens included; here they never are.

    Args:
        input_ids: ``(B, T)`` (or any shape) ``torch.long`` token ids; not modified.
        vocab_size: ``V``; ids must lie in ``[0, V)``.
        mask_id: the id of ``[MASK]`` (it is never selected, whether or not it is in ``special_ids``).
        special_ids: ids never selected.
        key_padding_mask: bool, same shape, ``True`` at padding (never selected); optional if ``[PAD]`` is in
            ``special_ids``.
        mlm_probability: :math:`p` in ``(0, 1]``.
        mask_fraction, random_fraction: the shares of ``[MASK]`` and random replacements among selected positions
            (their sum at most 1; the rest is kept).
        generator: a seeded ``torch.Generator`` for reproducible masks (``None``: PyTorch's global generator).

    Returns:
        :class:`MaskedTokens` ``(input_ids, labels, kind)``.

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for ids that are not ``torch.long`` or lie
            outside ``[0, V)``, a ``mask_id`` outside it, probabilities outside their ranges, fractions summing to
            more than 1, a ``key_padding_mask`` that is not bool of the same shape, or a vocabulary with no
            non-special id to draw random tokens from.

    Source: Devlin et al. (2019), Sec. 3.1 (Task #1: Masked LM) and Appendix C.2 (ablation over masking
    strategies).
    """
    _check_ids("input_ids", input_ids)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id must be an int in [0, {vocab_size}), got {mask_id!r}")
    p = _check_fraction("mlm_probability", mlm_probability, positive=True)
    f_mask = _check_fraction("mask_fraction", mask_fraction)
    f_random = _check_fraction("random_fraction", random_fraction)
    if f_mask + f_random > 1.0 + 1e-12:
        raise ValueError(f"mask_fraction + random_fraction must be at most 1, got {f_mask} + {f_random}")
    special_ids = sorted(set(special_ids) | {mask_id})
    never = special_tokens_mask(input_ids, special_ids)                               # (B, T)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, shape_hint="(B, T), True = padding")
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != input_ids.shape:
            raise ValueError(f"key_padding_mask must be a bool tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        never = never | key_padding_mask
    pool = torch.ones(vocab_size, dtype=torch.bool)
    pool[[i for i in special_ids if 0 <= i < vocab_size]] = False
    pool = pool.nonzero()[:, 0].to(input_ids.device)                                  # the non-special ids
    if len(pool) == 0:
        raise ValueError("the vocabulary has no non-special id to draw random tokens from")

    device = input_ids.device
    shape = input_ids.shape
    select_u = torch.rand(shape, generator=generator, device=device)                   # step 1
    how_u = torch.rand(shape, generator=generator, device=device)                      # step 2
    random_tokens = pool[torch.randint(len(pool), shape, generator=generator, device=device)]
    selected = (select_u < p) & ~never
    masked = selected & (how_u < f_mask)
    randomised = selected & (how_u >= f_mask) & (how_u < f_mask + f_random)

    corrupted = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(randomised, random_tokens, corrupted)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    kind = torch.full(shape, NOT_SELECTED, dtype=torch.uint8, device=device)
    kind[selected] = KEPT
    kind[masked] = MASKED
    kind[randomised] = RANDOM
    return MaskedTokens(corrupted, labels, kind)


# --------------------------------------------------------------------------------------------------------------
# Next-sentence prediction
# --------------------------------------------------------------------------------------------------------------

class NSPPair(NamedTuple):
    """A next-sentence-prediction example: segments ``a`` and ``b`` (whatever the documents hold: strings or
    lists of ids) and ``label``, **0 if b follows a** in its document (IsNext), **1 if b is random** (NotNext)."""

    a: Any
    b: Any
    label: int


def nsp_pairs(documents: Sequence[Sequence[Any]], random_probability: float = 0.5,
              generator: torch.Generator | None = None) -> list[NSPPair]:
    """Pairs of segments for next-sentence prediction.

    For each document ``d`` and each ``i < len(d) - 1``, ``a = d[i]``; with probability ``random_probability``
    ``b`` is a segment drawn uniformly from a **different** document (label 1, NotNext), otherwise ``b = d[i + 1]``
    (label 0, IsNext). Drawing from another document, as BERT's data script does, makes sure a "random" B never
    happens to be the true next segment.

    Args:
        documents: at least two non-empty sequences of segments (for example the speeches of each play).
        random_probability: the share of NotNext pairs, in ``[0, 1]`` (0.5 in BERT).
        generator: a seeded ``torch.Generator``.

    Returns:
        A list of :class:`NSPPair`, document by document, in order (shuffle them for training).

    Raises:
        ValueError: for fewer than two non-empty documents, or a ``random_probability`` outside ``[0, 1]``.

    Source: Devlin et al. (2019), Sec. 3.1 (Task #2: "50% of the time B is the actual next sentence that follows
    A (labeled as IsNext), and 50% of the time it is a random sentence from the corpus (labeled as NotNext)").
    """
    q = _check_fraction("random_probability", random_probability)
    documents = [list(d) for d in documents]
    if sum(1 for d in documents if d) < 2:
        raise ValueError("documents must hold at least two non-empty documents (a random B comes from another one)")
    sizes = torch.tensor([len(d) for d in documents], dtype=torch.float64)
    pairs = []
    for k, doc in enumerate(documents):
        if len(doc) < 2:
            continue
        n = len(doc) - 1
        coin = (torch.rand(n, generator=generator) < q).tolist()                    # True = NotNext
        others = sizes.clone()
        others[k] = 0                                                                # never the same document
        docs = torch.multinomial(others, n, replacement=True, generator=generator)  # (n,): by their sizes,
        picks = (torch.rand(n, generator=generator, dtype=torch.float64) * sizes[docs]).long()  # so every segment
        for i, (random_b, j, r) in enumerate(zip(coin, docs.tolist(), picks.tolist())):       # is equally likely
            pairs.append(NSPPair(doc[i], documents[j][r], 1) if random_b else NSPPair(doc[i], doc[i + 1], 0))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------

class BERTBatch(NamedTuple):
    """A padded batch of BERT inputs, three ``(B, T)`` tensors: ``input_ids`` (``torch.long``), ``token_type_ids``
    (0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``) and ``key_padding_mask`` (bool, **``True`` at padding**)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    key_padding_mask: torch.Tensor

    def to(self, device: torch.device | str) -> BERTBatch:
        return BERTBatch(*(t.to(device) for t in self))


def pack_batch(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]] | None = None, *, cls_id: int,
               sep_id: int, pad_id: int, max_len: int = 128) -> BERTBatch:
    """Pack token ids as BERT's input ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``, truncated to ``max_len``
    tokens and padded to the longest sequence of the batch.

    Token type ids are 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]`` (as the post-processor of
    :func:`tfcourse.data.shakespeare.train_wordpiece` makes them, and BERT's). A single segment too long loses its
    end. A pair too long for the budget ``m = max_len - 3`` is truncated "longest first", as Hugging Face
    ``tokenizers`` does it (whose encodings these equal): if the shorter segment takes at most half of ``m``, it
    stays whole and the longer one is cut to the rest; otherwise both are cut to half of ``m``, the longer one (B
    on a tie) getting the odd token. Tokens are removed from the end. BERT's own
    ``truncate_seq_pair`` (remove one token from the longer segment until the pair fits) gives the same lengths,
    except for which segment gets the odd token.

    Args:
        first: the segments A, each a sequence of ids without special tokens; second: the segments B (as many), or
            ``None``.
        cls_id, sep_id, pad_id: the ids of ``[CLS]``, ``[SEP]`` and ``[PAD]``.
        max_len: the most tokens of a packed sequence, special tokens included (at least 3 for single segments,
            5 for pairs, so that every segment keeps a token).

    Returns:
        A :class:`BERTBatch`.

    Raises:
        ValueError: for an empty ``first``, a ``second`` of another length, segments that are not sequences of
            ints, or a too small ``max_len``.

    Source: Devlin et al. (2019), Sec. 3 ("Input/Output Representations"); the reference code's
    ``create_pretraining_data.py`` (``truncate_seq_pair``).
    """
    first = [list(a) for a in first]
    if not first:
        raise ValueError("first must hold at least one segment")
    pairs = second is not None
    second = [list(b) for b in second] if pairs else [None] * len(first)
    if len(second) != len(first):
        raise ValueError(f"second must hold one segment per segment of first ({len(first)}), got {len(second)}")
    minimum = 5 if pairs else 3
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < minimum:
        raise ValueError(f"max_len must be an int >= {minimum}, got {max_len!r}")
    for name, value in (("cls_id", cls_id), ("sep_id", sep_id), ("pad_id", pad_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    budget = max_len - (3 if pairs else 2)
    rows = []
    for a, b in zip(first, second):
        if b is None:
            a = a[:budget]
            rows.append(([cls_id, *a, sep_id], [0] * (len(a) + 2)))
            continue
        if len(a) + len(b) > budget:  # longest first, as tokenizers' TruncationStrategy::LongestFirst
            n_short, n_long = sorted((len(a), len(b)))
            n_long = n_short if n_short > budget else max(n_short, budget - n_short)
            if n_short + n_long > budget:                       # both must be cut: half each
                n_short, n_long = budget // 2, budget // 2 + budget % 2
            n_a, n_b = (n_long, n_short) if len(a) > len(b) else (n_short, n_long)
            a, b = a[:n_a], b[:n_b]
        rows.append(([cls_id, *a, sep_id, *b, sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1)))
    T = max(len(ids) for ids, _ in rows)
    try:
        input_ids = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in rows], dtype=torch.long)  # (B, T)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"segments must be sequences of int token ids: {error}") from None
    token_type_ids = torch.tensor([types + [0] * (T - len(types)) for _, types in rows], dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    key_padding_mask = torch.arange(T) >= lengths[:, None]                                            # (B, T)
    return BERTBatch(input_ids, token_type_ids, key_padding_mask)


def encode_batch(tokenizer, first: Sequence[str], second: Sequence[str] | None = None,
                 max_len: int = 128) -> BERTBatch:
    """Tokenize texts (or pairs of texts) with a WordPiece ``tokenizers.Tokenizer`` and pack them with
    :func:`pack_batch`: ``[CLS] A [SEP] (B [SEP])``, truncated to ``max_len``, padded. The tokenizer's ``[CLS]``,
    ``[SEP]`` and ``[PAD]`` ids are used; the tokenizer itself is not changed.

    Raises:
        ValueError: for an empty ``first``, a ``second`` of another length, texts that are not str, a too small
            ``max_len``, or a tokenizer without ``[CLS]``, ``[SEP]`` or ``[PAD]``.
    """
    first = [first] if isinstance(first, str) else list(first)
    if not first or not all(isinstance(t, str) for t in first):
        raise ValueError("first must be a non-empty sequence of str")
    if second is not None:
        second = [second] if isinstance(second, str) else list(second)
        if len(second) != len(first) or not all(isinstance(t, str) for t in second):
            raise ValueError(f"second must hold one str per text of first ({len(first)})")
    special = {name: tokenizer.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
    missing = [name for name, i in special.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token")

    def ids(texts):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return pack_batch(ids(first), ids(second) if second is not None else None, cls_id=special["[CLS]"],
                      sep_id=special["[SEP]"], pad_id=special["[PAD]"], max_len=max_len)
