"""A recurrent encoder-decoder, without attention or with Bahdanau or Luong attention (chapter 2).

The encoder is a bidirectional GRU over the source tokens. The decoder is a GRU cell that writes one target token
per step. What it may read of the source is what distinguishes the variants (``attention=``):

* ``None``: one fixed context vector, the encoder's final states, at every step: the RNN encoder-decoder of
  Cho et al. (2014), whose context is a bottleneck;
* ``"bahdanau"``: additive attention whose query is the **previous** decoder state :math:`s_{i-1}`, and whose context
  is an input of the GRU (Bahdanau et al., 2015, Eqs. 4-6 and Appendix A);
* ``"dot"``, ``"general"``, ``"concat"``: Luong et al. (2015) global attention, whose query is the **current**
  decoder state :math:`h_t`, with the three scores of their Eq. 8, the attentional hidden state
  :math:`\\tilde h_t = \\tanh(W_c[c_t; h_t])` of Eq. 5 and input feeding (Sec. 3.3: :math:`\\tilde h_{t-1}` is an
  input of the next step).

All variants share the sizes and the output layer, :math:`p(y_t) = \\mathrm{softmax}(W_s \\tilde h_t)`, with
:math:`\\tilde h_t = \\tanh(W_c [c_t; s_t])` (Luong Eqs. 5-6; for Bahdanau a simplification of his maxout layer), so
that an experiment that changes ``attention`` changes nothing else. The scores come from
:mod:`tfcourse.attention`.

Shapes: ``B`` batch, ``S`` source length, ``T`` target length, ``V`` target vocabulary, ``d`` = ``d_hidden``.
Token ids: ``pad_id`` (0), ``bos_id`` (1) and ``eos_id`` (2), as in :class:`tfcourse.data.numbers.Vocab`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .._checks import DtypeError, check_tensor
from ..attention import AdditiveScore, Attention, DotProductScore, MultiplicativeScore, lengths_to_mask

if TYPE_CHECKING:
    from ..data.numbers import NumberPair, NumberTranslation

__all__ = [
    "ATTENTION_KINDS",
    "Seq2SeqConfig",
    "Encoder",
    "EncoderMemory",
    "DecoderState",
    "Seq2SeqOutput",
    "Seq2Seq",
    "fit",
    "translate",
    "Translation",
    "exact_match",
    "corpus_bleu",
    "by_length",
]

ATTENTION_KINDS = (None, "bahdanau", "dot", "general", "concat")
"""The decoder variants: no attention, Bahdanau's, and Luong's three scores."""


@dataclass
class Seq2SeqConfig:
    """Sizes and variant of a :class:`Seq2Seq` model.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (special tokens included).
        d_emb: token embedding size.
        d_hidden: the size ``d`` of the encoder states (both directions together), the decoder state and the
            attentional state; a bidirectional encoder gives each direction ``d / 2`` units.
        attention: one of :data:`ATTENTION_KINDS`.
        d_attn: hidden size of the additive score (``"bahdanau"`` and ``"concat"``); default ``d_hidden``.
        bidirectional: a bidirectional encoder (Bahdanau's) or a forward one.
        pad_id, bos_id, eos_id: the special token ids.

    Raises:
        ValueError: for non-positive sizes, an odd ``d_hidden`` with a bidirectional encoder, an unknown
            ``attention`` or clashing special ids.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_emb: int = 64
    d_hidden: int = 64
    attention: str | None = "bahdanau"
    d_attn: int | None = None
    bidirectional: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "d_emb", "d_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_attn is None:
            self.d_attn = self.d_hidden
        if isinstance(self.d_attn, bool) or not isinstance(self.d_attn, int) or self.d_attn < 1:
            raise ValueError(f"d_attn must be a positive int or None, got {self.d_attn!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.bidirectional and self.d_hidden % 2:
            raise ValueError(f"d_hidden must be even with a bidirectional encoder, got {self.d_hidden}")
        specials = (self.pad_id, self.bos_id, self.eos_id)
        if len(set(specials)) != 3 or min(specials) < 0 or max(specials) >= min(self.src_vocab_size,
                                                                                 self.tgt_vocab_size):
            raise ValueError(f"pad_id, bos_id, eos_id must be distinct ids inside both vocabularies, got {specials}")


class EncoderMemory(NamedTuple):
    """What the decoder may read: ``states`` ``(B, S, d)`` (zero at padding), ``summary`` ``(B, d)`` (the final
    states of both directions) and ``mask`` ``(B, S)`` bool, ``True`` at real source tokens."""

    states: torch.Tensor
    summary: torch.Tensor
    mask: torch.Tensor


class DecoderState(NamedTuple):
    """The decoder's recurrent state: ``hidden`` :math:`s_t` ``(B, d)`` and ``attentional`` :math:`\\tilde h_t`
    ``(B, d)`` (fed to the next step by Luong's input feeding; zeros before the first step)."""

    hidden: torch.Tensor
    attentional: torch.Tensor


class Seq2SeqOutput(NamedTuple):
    """``logits`` ``(B, T, V)`` and ``attention`` ``(B, T, S)`` (``None`` without attention): row ``t`` holds the
    weights over the source tokens used to write target token ``t``."""

    logits: torch.Tensor
    attention: torch.Tensor | None


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """Embedding and a (bidirectional) GRU over padded source sequences.

    ``forward(src (B, S) int64, src_lengths (B,) int64) -> EncoderMemory``. Padding is packed away
    (:func:`torch.nn.utils.rnn.pack_padded_sequence`), so the backward direction starts at each sequence's own last
    token and a sequence's states do not depend on how much padding follows it.

    Source: Bahdanau et al. (2015), Sec. 3.2 (the bidirectional encoder, :math:`h_j = [\\overrightarrow{h}_j;
    \\overleftarrow{h}_j]`).
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.src_vocab_size, config.d_emb, padding_idx=config.pad_id)
        d_rnn = config.d_hidden // 2 if config.bidirectional else config.d_hidden
        self.rnn = nn.GRU(config.d_emb, d_rnn, batch_first=True, bidirectional=config.bidirectional)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderMemory:
        _check_ids("src", src, self.config.src_vocab_size, "(B, S)")
        _check_lengths("src_lengths", src_lengths, src)
        B, S = src.shape
        packed = pack_padded_sequence(self.embedding(src), src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, last = self.rnn(packed)  # last: (n_directions, B, d / n_directions)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=S)  # (B, S, d)
        summary = torch.cat(list(last), dim=-1)  # (B, d): forward state at the last token, backward at the first
        return EncoderMemory(states, summary, lengths_to_mask(src_lengths, max_len=S))


# --------------------------------------------------------------------------------------------------------------
# Encoder-decoder
# --------------------------------------------------------------------------------------------------------------

class Seq2Seq(nn.Module):
    """GRU encoder-decoder with optional attention (see the module docstring for the variants).

    Args:
        config: a :class:`Seq2SeqConfig`.

    Main methods:
        ``forward(src, src_lengths, tgt_in, teacher_forcing=1.0) -> Seq2SeqOutput`` (training),
        ``greedy_decode(src, src_lengths, max_len) -> (tokens, attention)`` (inference),
        ``encode`` / ``init_state`` / ``step`` (one decoder step, for tests and for inspection).

    Parameters: ``encoder``, ``tgt_embedding``, ``init`` (:math:`s_0 = \\tanh(W_{init}\\,\\mathrm{summary})`,
    Bahdanau Appendix A.2.2 with both directions), ``cell`` (``nn.GRUCell`` with input ``[E y; c]`` or
    ``[E y; \\tilde h_{t-1}]``), ``attention`` (a :class:`tfcourse.attention.Attention`, or ``None``), ``combine``
    (:math:`W_c`) and ``out`` (:math:`W_s`).
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.tgt_embedding = nn.Embedding(c.tgt_vocab_size, c.d_emb, padding_idx=c.pad_id)
        self.init = nn.Linear(c.d_hidden, c.d_hidden)
        self.cell = nn.GRUCell(c.d_emb + c.d_hidden, c.d_hidden)
        scores = {
            "bahdanau": lambda: AdditiveScore(c.d_hidden, c.d_hidden, c.d_attn),  # Bahdanau Eq. 6, App. A.1.2
            "concat": lambda: AdditiveScore(c.d_hidden, c.d_hidden, c.d_attn),  # Luong Eq. 8: v^T tanh(W[h_t; h_s])
            "general": lambda: MultiplicativeScore(c.d_hidden, c.d_hidden),  # Luong Eq. 8: h_t^T W h_s
            "dot": lambda: DotProductScore(),  # Luong Eq. 8: h_t^T h_s
        }
        self.attention = Attention(scores[c.attention]()) if c.attention else None
        self.combine = nn.Linear(2 * c.d_hidden, c.d_hidden, bias=False)  # W_c, Luong Eq. 5
        self.out = nn.Linear(c.d_hidden, c.tgt_vocab_size)  # W_s, Luong Eq. 6

    @property
    def luong(self) -> bool:
        """Whether the query is the current decoder state (Luong) rather than the previous one (Bahdanau)."""
        return self.config.attention in ("dot", "general", "concat")

    def extra_repr(self) -> str:
        return f"attention={self.config.attention!r}"

    # ---------------------------------------------------------------------------------------------- the pieces

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderMemory:
        """Run the encoder: ``src`` ``(B, S)``, ``src_lengths`` ``(B,)`` -> :class:`EncoderMemory`."""
        return self.encoder(src, src_lengths)

    def init_state(self, memory: EncoderMemory) -> DecoderState:
        """:math:`s_0 = \\tanh(W_{init}\\,\\mathrm{summary})` and :math:`\\tilde h_0 = 0`."""
        hidden = torch.tanh(self.init(memory.summary))  # (B, d)
        return DecoderState(hidden, torch.zeros_like(hidden))

    def attend(self, query: torch.Tensor, memory: EncoderMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention read: ``query`` ``(B, d)`` -> context ``(B, d)``, weights ``(B, S)`` (zero at padding)."""
        context, weights = self.attention(query[:, None, :], memory.states, memory.states,
                                          memory.mask[:, None, :])  # (B, 1, d), (B, 1, S)
        return context[:, 0], weights[:, 0]

    def step(self, prev_tokens: torch.Tensor, state: DecoderState,
             memory: EncoderMemory) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One decoder step: read the previous token, update the state, attend, predict the next token.

        Args:
            prev_tokens: ``(B,)`` int64, the previous target token :math:`y_{t-1}` (``<bos>`` at the first step).
            state: the :class:`DecoderState` after the previous step (:meth:`init_state` at the first).
            memory: the :class:`EncoderMemory` of the source.

        Returns:
            ``logits`` ``(B, V)``, the new :class:`DecoderState`, and the attention weights ``(B, S)`` (``None``
            without attention).

        Sources: Bahdanau et al. (2015), Eqs. 4-6: :math:`c_i = \\sum_j \\alpha_{ij} h_j` with
        :math:`\\alpha_{ij} = \\mathrm{softmax}_j\\, a(s_{i-1}, h_j)`, then :math:`s_i = f(s_{i-1}, y_{i-1}, c_i)`.
        Luong et al. (2015), Sec. 3: :math:`h_t = f(h_{t-1}, [y_{t-1}; \\tilde h_{t-1}])`, then
        :math:`c_t` from :math:`\\mathrm{score}(h_t, \\bar h_s)` (Eqs. 7-8), :math:`\\tilde h_t =
        \\tanh(W_c[c_t; h_t])` (Eq. 5), :math:`p(y_t) = \\mathrm{softmax}(W_s \\tilde h_t)` (Eq. 6).
        """
        embedded = self.tgt_embedding(prev_tokens)  # (B, d_emb)
        if self.attention is None:  # Cho et al. (2014): the same context at every step
            context, weights = memory.summary, None
            hidden = self.cell(torch.cat([embedded, context], dim=-1), state.hidden)
        elif not self.luong:  # Bahdanau: attend with the previous state s_{i-1}, then update the state
            context, weights = self.attend(state.hidden, memory)
            hidden = self.cell(torch.cat([embedded, context], dim=-1), state.hidden)
        else:  # Luong: update the state (input feeding), then attend with the current state h_t
            hidden = self.cell(torch.cat([embedded, state.attentional], dim=-1), state.hidden)
            context, weights = self.attend(hidden, memory)
        attentional = torch.tanh(self.combine(torch.cat([context, hidden], dim=-1)))  # (B, d), Luong Eq. 5
        return self.out(attentional), DecoderState(hidden, attentional), weights  # logits (B, V), Luong Eq. 6

    # ------------------------------------------------------------------------------------------- whole sequences

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor,
                teacher_forcing: float = 1.0, generator: torch.Generator | None = None) -> Seq2SeqOutput:
        """Decode ``T`` steps, feeding the reference tokens (teacher forcing) or the model's own predictions.

        Args:
            src: ``(B, S)`` int64 source ids, padded with ``pad_id``.
            src_lengths: ``(B,)`` int64, each in ``[1, S]``.
            tgt_in: ``(B, T)`` int64 decoder inputs ``<bos> y_1 ... y_{T-1}`` (padded).
            teacher_forcing: the probability that step ``t > 0`` reads the reference token ``tgt_in[:, t]`` rather
                than the model's own greedy prediction of step ``t - 1`` (drawn per token, Bengio et al. 2015).
                ``1.0`` is teacher forcing (Williams and Zipser, 1989), ``0.0`` free running. Predictions are fed
                without gradient (argmax).
            generator: the random generator of those draws (only used when ``0 < teacher_forcing < 1``).

        Returns:
            :class:`Seq2SeqOutput` with logits ``(B, T, V)`` and attention ``(B, T, S)`` or ``None``.

        Raises:
            ValueError: for badly shaped or typed inputs, ids outside the vocabularies, lengths outside ``[1, S]``
                or a ``teacher_forcing`` outside ``[0, 1]``.
        """
        _check_ids("src", src, self.config.src_vocab_size, "(B, S)")
        _check_ids("tgt_in", tgt_in, self.config.tgt_vocab_size, "(B, T)")
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"tgt_in must have the batch size of src ({src.shape[0]}), got shape "
                             f"{tuple(tgt_in.shape)}")
        if isinstance(teacher_forcing, bool) or not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing must be a probability in [0, 1], got {teacher_forcing!r}")
        memory = self.encode(src, src_lengths)
        state = self.init_state(memory)
        tokens = tgt_in[:, 0]
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            if t > 0 and teacher_forcing < 1.0:
                predicted = logits[-1].argmax(-1)  # (B,), no gradient flows through argmax
                if teacher_forcing == 0.0:
                    tokens = predicted
                else:
                    gold = torch.rand(tgt_in.shape[0], generator=generator, device=tgt_in.device) < teacher_forcing
                    tokens = torch.where(gold, tgt_in[:, t], predicted)
            elif t > 0:
                tokens = tgt_in[:, t]
            step_logits, state, step_weights = self.step(tokens, state, memory)
            logits.append(step_logits)
            weights.append(step_weights)
        attention = torch.stack(weights, dim=1) if self.attention is not None else None  # (B, T, S)
        return Seq2SeqOutput(torch.stack(logits, dim=1), attention)  # (B, T, V)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, src_lengths: torch.Tensor,
                      max_len: int = 50) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write each target token as the most probable one given the model's own previous tokens.

        Args:
            src: ``(B, S)`` int64 source ids; src_lengths: ``(B,)`` int64.
            max_len: the most tokens to write (``<eos>`` included).

        Returns:
            ``tokens`` ``(B, T')`` int64 with ``T' <= max_len``: each row ends with ``<eos>`` (unless it ran out of
            steps), followed by ``pad_id``; and ``attention`` ``(B, T', S)`` (zero after ``<eos>``), or ``None``.
            Decoding stops as soon as every row has written ``<eos>``.

        Raises:
            ValueError: for bad inputs or a ``max_len`` below 1.
        """
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        c = self.config
        memory = self.encode(src, src_lengths)
        state = self.init_state(memory)
        tokens = torch.full((src.shape[0],), c.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        out, weights = [], []
        for _ in range(max_len):
            logits, state, step_weights = self.step(tokens, state, memory)
            tokens = logits.argmax(-1).masked_fill(done, c.pad_id)  # (B,)
            out.append(tokens)
            if step_weights is not None:
                weights.append(step_weights.masked_fill(done[:, None], 0.0))
            done = done | (tokens == c.eos_id)
            if done.all():
                break
        attention = torch.stack(weights, dim=1) if weights else None  # (B, T', S)
        return torch.stack(out, dim=1), attention  # (B, T')


# --------------------------------------------------------------------------------------------------------------
# Training and translation on a NumberTranslation task
# --------------------------------------------------------------------------------------------------------------

def fit(model: Seq2Seq, task: NumberTranslation, steps: int, batch_size: int = 64, lr: float = 3e-3,
        teacher_forcing: float | Callable[[int], float] = 1.0, seed: int = 0, clip: float = 1.0,
        progress: bool | str = False) -> list[float]:
    """Train ``model`` on ``task.train`` with Adam and the token-level cross-entropy (padding ignored).

    Args:
        model: a :class:`Seq2Seq` whose vocabularies match the task's.
        task: a :class:`tfcourse.data.numbers.NumberTranslation`.
        steps: the number of optimizer steps, each on ``batch_size`` pairs drawn without replacement (the
            training set is reshuffled whenever it runs out).
        lr: Adam's learning rate; clip: the gradient-norm clipping threshold.
        teacher_forcing: a probability, or a function of the step index returning one (a schedule, as in
            scheduled sampling, Bengio et al. 2015); passed to :meth:`Seq2Seq.forward`.
        seed: seeds the batch order and the teacher-forcing draws (not the model's initial weights).
        progress: show a tqdm progress bar (a string is its description).

    Returns:
        The training loss of every step (nats per target token).

    Raises:
        ValueError: for a non-positive ``steps`` or ``batch_size``, or vocabularies that do not match.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (model.config.src_vocab_size, model.config.tgt_vocab_size) != (len(task.src_vocab), len(task.tgt_vocab)):
        raise ValueError("the model's vocabulary sizes must equal the task's (src_vocab, tgt_vocab): got "
                         f"{(model.config.src_vocab_size, model.config.tgt_vocab_size)} and "
                         f"{(len(task.src_vocab), len(task.tgt_vocab))}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    data = task.batch(task.train).to(device)  # every training pair, encoded once
    generator = torch.Generator().manual_seed(seed)
    draws = torch.Generator(device=device).manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches, losses = [], []
    model.train()
    bar = range(steps)
    if progress:
        bar = tqdm(bar, desc=progress if isinstance(progress, str) else "training", leave=False)
    for step in bar:
        if not batches:
            batches = _epoch_batches(len(data), batch_size, generator)
        idx = batches.pop().to(device)
        src_len, tgt_len = int(data.src_lengths[idx].max()), int(data.tgt_lengths[idx].max())
        ratio = teacher_forcing(step) if callable(teacher_forcing) else teacher_forcing
        output = model(data.src[idx, :src_len], data.src_lengths[idx], data.tgt_in[idx, :tgt_len],
                       teacher_forcing=ratio, generator=draws)
        loss = F.cross_entropy(output.logits.flatten(0, 1), data.tgt_out[idx, :tgt_len].flatten(),
                               ignore_index=model.config.pad_id)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of ``n`` examples cut into batches of indices (the last, partial one dropped unless it is
    the only one), in the order they are to be popped."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches[::-1]


class Translation(NamedTuple):
    """Greedy translations of some pairs: the predicted strings, their tokens, and each one's attention weights
    ``(T_i, S_i)`` (target tokens with ``<eos>`` x source tokens with ``<eos>``), or ``None`` without attention."""

    predictions: list[str]
    tokens: list[list[str]]
    attention: list[torch.Tensor] | None


def translate(model: Seq2Seq, task: NumberTranslation, pairs: Sequence[NumberPair], batch_size: int = 500,
              max_len: int = 40) -> Translation:
    """Greedy-decode the source of each pair (in batches) and detokenize the result.

    Args:
        model: a trained :class:`Seq2Seq` for ``task``.
        task: the :class:`tfcourse.data.numbers.NumberTranslation` whose vocabularies and tokenizer to use.
        pairs: the :class:`tfcourse.data.numbers.NumberPair` to translate (their targets are not used).
        batch_size: pairs decoded at once; max_len: the most target tokens per pair (``<eos>`` included).

    Returns:
        A :class:`Translation`, in the order of ``pairs``.

    Raises:
        ValueError: if a token of a pair is not in the task's vocabularies (see :meth:`Vocab.encode`).
    """
    device = next(model.parameters()).device
    predictions, tokens, attention = [], [], [] if model.attention is not None else None
    model.eval()
    for start in range(0, len(pairs), batch_size):
        batch = task.batch(pairs[start:start + batch_size]).to(device)
        ids, weights = model.greedy_decode(batch.src, batch.src_lengths, max_len=max_len)
        for row in range(len(batch)):
            words = task.tgt_vocab.decode(ids[row])
            tokens.append(words)
            predictions.append(task.decode_target(ids[row]))
            if attention is not None:
                n_out = min(len(words) + 1, ids.shape[1])  # the tokens and <eos>
                attention.append(weights[row, :n_out, : int(batch.src_lengths[row])].cpu())
    return Translation(predictions, tokens, attention)


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------

def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference, in ``[0, 1]``.

    Raises:
        ValueError: if the two lists differ in length or are empty.
    """
    _check_parallel(predictions=predictions, references=references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def corpus_bleu(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of token lists, with ``sacrebleu`` on the tokens as given (``tokenize="none"``).

    The tokens are the task's (German morphemes, French words), so BLEU gives partial credit inside a German
    compound, which word-level BLEU would count as a single word. The n-gram orders that no prediction has are
    left out (sacrebleu's ``effective_order``): a corpus of 1- to 3-token sentences is scored on its 1- to 3-grams
    instead of getting 0 for lack of 4-grams; a zero precision is smoothed as by sacrebleu's default (``"exp"``).
    Sources: Papineni et al. (2002), Sec. 2.3; Post (2018).

    Raises:
        ValueError: if the two lists differ in length or are empty.
    """
    _check_parallel(predictions=predictions, references=references)
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="none", effective_order=True)
    return bleu.corpus_score([" ".join(p) for p in predictions], [[" ".join(r) for r in references]]).score


def by_length(metric: Callable[[list, list], float], predictions: Sequence, references: Sequence,
              lengths: Sequence[Hashable]) -> dict:
    """Apply ``metric(predictions, references)`` to each group of examples with the same length (or any key).

    Example: ``by_length(exact_match, preds, refs, [task.source_length(p) for p in task.test])`` gives
    ``{1: 1.0, 3: 0.97, ...}``, keys sorted.

    Raises:
        ValueError: if the three lists differ in length or are empty.
    """
    _check_parallel(predictions=predictions, references=references, lengths=lengths)
    groups: dict = defaultdict(lambda: ([], []))
    for p, r, n in zip(predictions, references, lengths):
        groups[n][0].append(p)
        groups[n][1].append(r)
    return {n: metric(*groups[n]) for n in sorted(groups)}


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------

def _check_ids(name: str, ids: object, vocab_size: int, hint: str) -> None:
    check_tensor(name, ids, ndim=2, shape_hint=hint)
    if ids.dtype != torch.long:
        raise DtypeError(f"{name} must be int64 token ids {hint}, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{name}: ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")


def _check_lengths(name: str, lengths: object, src: torch.Tensor) -> None:
    check_tensor(name, lengths, ndim=1, shape_hint="(B,)")
    if lengths.dtype not in (torch.int64, torch.int32):
        raise DtypeError(f"{name} must be an integer tensor (B,), got {lengths.dtype}")
    if lengths.shape[0] != src.shape[0]:
        raise ValueError(f"{name} must have one length per sequence ({src.shape[0]}), got {lengths.shape[0]}")
    if lengths.min() < 1 or lengths.max() > src.shape[1]:
        raise ValueError(f"{name} must lie in [1, S={src.shape[1]}], got {lengths.tolist()}")


def _check_parallel(**columns: Sequence) -> None:
    sizes = {name: len(col) for name, col in columns.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the lists must have equal lengths, got {sizes}")
    if not next(iter(sizes.values())):
        raise ValueError("the lists must not be empty")
