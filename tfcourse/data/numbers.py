"""Number words: a translation task with real linguistic rules, generated offline (chapters 2, 6 and 15).

English number words are translated into German or French number words, all written by the PyPI package
``num2words``. The languages disagree in instructive ways:

* German writes a number below a million as one compound and says the units before the tens:
  ``"three hundred and fifty-four"`` is ``"dreihundertvierundfünfzig"`` (three-hundred-four-and-fifty), so a good
  alignment of English and German *crosses*;
* French counts in twenties from 60 on: ``"ninety-seven"`` is ``"quatre-vingt-dix-sept"`` (four-twenty-ten-seven),
  one English word becomes several French ones, and ``"eighty"`` is ``"quatre-vingts"`` with an ``s``.

The data is unlimited and deterministic: the splits are made **by number** (a number's translation is never in two
splits), from a seed.

Typical use::

    task = NumberTranslation.from_numbers("de", sample_numbers(5000, high=9999, seed=0), seed=0)
    batch = task.batch(task.train[:64])       # padded tensors for a seq2seq model
    task.tgt_vocab.decode(batch.tgt_out[0])   # the first target's tokens: ['vier']

**Tokenization.** English and French are split into words at spaces and hyphens, and the hyphen is kept as a token
of its own (English also keeps the comma of ``"one thousand, two hundred"``): French hyphenation is part of the
spelling (``"quatre-vingt-dix"`` but ``"vingt et un"``), and keeping it makes :func:`detokenize` the exact inverse
of :func:`tokenize`, so that a predicted token sequence can be compared with the reference *string*. German
compounds are split into **morphemes** by greedy longest match over the closed inventory :data:`GERMAN_MORPHEMES`
(``"einundzwanzig"`` -> ``ein und zwanzig``): a word-level tokenizer would see 10,000 different one-word
"sentences" in 1..9999, and a character-level one makes sequences three times longer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from num2words import num2words

__all__ = [
    "LANGUAGES",
    "MAX_NUMBER",
    "GERMAN_MORPHEMES",
    "number_to_words",
    "NumberPair",
    "make_number_pairs",
    "sample_numbers",
    "NumberSplit",
    "split_numbers",
    "segment_german",
    "tokenize",
    "detokenize",
    "gold_alignment",
    "Vocab",
    "Seq2SeqBatch",
    "NumberTranslation",
]

LANGUAGES = ("en", "de", "fr")
"""The languages of the task: English (the usual source), German and French."""

MAX_NUMBER = 999_999
"""The largest number supported: German writes a million as two words (``"eine Million"``), outside the task."""

GERMAN_MORPHEMES = (
    # the numbers 0-19 as num2words spells them ("eins" alone and at the end of a compound) ...
    "null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
    "zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn", "achtzehn", "neunzehn",
    # ... the tens ...
    "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig",
    # ... and the pieces that join them: "ein" before hundert/tausend/und, "und" between units and tens.
    "ein", "und", "hundert", "tausend",
)
"""The closed inventory of morphemes that German number words below a million are made of (32 of them).

Teens and tens are kept whole (``"siebzehn"``, ``"siebzig"``), as each is one English word; :func:`segment_german`
checks that every word segments completely."""

_GERMAN_BY_LENGTH = sorted(GERMAN_MORPHEMES, key=len, reverse=True)
_WORD_LEVEL = re.compile(r"[^\s,\-]+|[,\-]")  # words, and each hyphen or comma as a token of its own


def _check_lang(lang: object, name: str = "lang") -> str:
    if lang not in LANGUAGES:
        raise ValueError(f"{name} must be one of {LANGUAGES}, got {lang!r}")
    return lang  # type: ignore[return-value]


def _check_number(n: object, name: str = "number") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"{name} must be an int in [0, {MAX_NUMBER}], got {n!r}")
    return n


# --------------------------------------------------------------------------------------------------------------
# Numbers and their words
# --------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _words(n: int, lang: str) -> str:
    return num2words(n, lang=lang)


def number_to_words(n: int, lang: str) -> str:
    """The cardinal number ``n`` in words, as ``num2words`` writes it (results are cached: num2words is slow).

    Args:
        n: an int in ``[0, MAX_NUMBER]``.
        lang: ``"en"``, ``"de"`` or ``"fr"``.

    Returns:
        For example ``number_to_words(97, "fr") == "quatre-vingt-dix-sept"``.

    Raises:
        ValueError: if ``n`` is not an int in range, or ``lang`` is not supported.
    """
    return _words(_check_number(n, "n"), _check_lang(lang))


class NumberPair(NamedTuple):
    """One example: the number, its words in the source language and in the target language."""

    number: int
    source: str
    target: str


def make_number_pairs(lang: str, numbers: Iterable[int], src_lang: str = "en") -> list[NumberPair]:
    """Translation pairs ``(number, source words, target words)`` for the given numbers, in their order.

    Args:
        lang: the target language, ``"de"`` or ``"fr"`` (or ``"en"``).
        numbers: ints in ``[0, MAX_NUMBER]``.
        src_lang: the source language (default English).

    Returns:
        A list of :class:`NumberPair`, e.g. ``NumberPair(21, "twenty-one", "einundzwanzig")`` for ``lang="de"``.

    Raises:
        ValueError: for an unsupported language, equal source and target languages, or a number out of range.
    """
    _check_lang(lang)
    _check_lang(src_lang, "src_lang")
    if lang == src_lang:
        raise ValueError(f"lang and src_lang must differ, got {lang!r} for both")
    return [NumberPair(n, number_to_words(n, src_lang), number_to_words(n, lang))
            for n in (_check_number(n, "numbers[i]") for n in numbers)]


def sample_numbers(count: int, high: int = 9999, low: int = 1, seed: int = 0, by_digits: bool = True) -> list[int]:
    """Draw ``count`` distinct numbers from ``[low, high]``, reproducibly.

    Args:
        count: how many numbers, at most ``high - low + 1``.
        high, low: the inclusive range, within ``[0, MAX_NUMBER]``.
        seed: the seed of the draw.
        by_digits: if True (default), every number of digits gets an equal share of ``count`` (a band too small
            for its share gives all its numbers and the rest goes to the other bands), so that short numbers are
            not swamped: uniformly drawn from 1..999999, 99.9% of numbers would have 4 digits or more.

    Returns:
        A sorted list of ``count`` distinct ints.

    Raises:
        ValueError: for an empty or out-of-range interval, or a ``count`` that does not fit in it.
    """
    _check_number(low, "low")
    _check_number(high, "high")
    if high < low:
        raise ValueError(f"high must be >= low, got low={low}, high={high}")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= high - low + 1:
        raise ValueError(f"count must be an int in [0, {high - low + 1}] (the size of [low, high]), got {count!r}")
    rng = random.Random(seed)
    if not by_digits:
        return sorted(rng.sample(range(low, high + 1), count))
    bands = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        lo, hi = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(high, 10**digits - 1)
        bands.append(range(lo, hi + 1))
    # Fill the smallest bands first; whatever a band cannot take is shared among the larger ones.
    chosen, left = [], count
    for i, band in enumerate(sorted(bands, key=len)):
        take = min(len(band), -(-left // (len(bands) - i)))  # ceil(left / bands still to fill)
        chosen.extend(rng.sample(band, take))
        left -= take
    return sorted(chosen)


class NumberSplit(NamedTuple):
    """Disjoint train, validation and test numbers."""

    train: list[int]
    valid: list[int]
    test: list[int]


def split_numbers(numbers: Iterable[int], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> NumberSplit:
    """Shuffle distinct numbers with a seed and split them into train, validation and test sets.

    Splitting by number means that no translation is in two splits; the model must generalise to unseen
    combinations of the parts it has seen ("seven hundred and twelve" from "seven hundred and x" and "twelve").

    Args:
        numbers: distinct ints in ``[0, MAX_NUMBER]``.
        fractions: three non-negative fractions that sum to 1 (train, valid, test). The validation and test sizes
            are rounded down; the training set gets the rest.
        seed: the seed of the shuffle.

    Returns:
        A :class:`NumberSplit` of three sorted lists.

    Raises:
        ValueError: for duplicate or out-of-range numbers, or bad fractions.
    """
    numbers = [_check_number(n, "numbers[i]") for n in numbers]
    if len(set(numbers)) != len(numbers):
        raise ValueError("numbers must be distinct (a number in two splits would leak test data into training)")
    fractions = tuple(fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers that sum to 1, got {fractions}")
    shuffled = sorted(numbers)
    random.Random(seed).shuffle(shuffled)
    n_valid, n_test = int(fractions[1] * len(numbers)), int(fractions[2] * len(numbers))
    n_train = len(numbers) - n_valid - n_test
    return NumberSplit(sorted(shuffled[:n_train]), sorted(shuffled[n_train:n_train + n_valid]),
                       sorted(shuffled[n_train + n_valid:]))


# --------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------

def segment_german(word: str) -> list[str]:
    """Split a German number word into morphemes by greedy longest match over :data:`GERMAN_MORPHEMES`.

    Example: ``segment_german("dreihundertvierundfünfzig") == ["drei", "hundert", "vier", "und", "fünfzig"]``.

    Raises:
        ValueError: if some part of ``word`` matches no morpheme (the word is not a number word below a million).
    """
    if not isinstance(word, str):
        raise TypeError(f"word must be a str, got {type(word).__name__}")
    pieces, i = [], 0
    while i < len(word):
        match = next((m for m in _GERMAN_BY_LENGTH if word.startswith(m, i)), None)
        if match is None:
            raise ValueError(f"cannot segment German number word {word!r}: no morpheme matches {word[i:]!r}")
        pieces.append(match)
        i += len(match)
    if not pieces:
        raise ValueError("cannot segment an empty German word")
    return pieces


def tokenize(text: str, lang: str) -> list[str]:
    """Split number words into tokens: morphemes for German, words, hyphens and commas for English and French.

    Examples: ``tokenize("twenty-one", "en") == ["twenty", "-", "one"]``;
    ``tokenize("einundzwanzig", "de") == ["ein", "und", "zwanzig"]``;
    ``tokenize("vingt et un", "fr") == ["vingt", "et", "un"]``.

    Raises:
        ValueError: for an unsupported language, empty text, or a German word that does not segment.
    """
    _check_lang(lang)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text must not be empty")
    if lang == "de":
        return [piece for word in text.split() for piece in segment_german(word)]
    return _WORD_LEVEL.findall(text)


def detokenize(tokens: Sequence[str], lang: str) -> str:
    """The inverse of :func:`tokenize`: ``detokenize(tokenize(s, lang), lang) == s`` for every number word ``s``.

    German morphemes are concatenated; English and French words are joined by spaces, hyphens join their
    neighbours without spaces and a comma attaches to the word before it.

    Raises:
        ValueError: for an unsupported language.
    """
    _check_lang(lang)
    if lang == "de":
        return "".join(tokens)
    out = ""
    for i, token in enumerate(tokens):
        glue = i == 0 or token in {"-", ","} or tokens[i - 1] == "-"
        out += token if glue else " " + token
    return out


_ENGLISH_VALUES = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_ENGLISH_VALUES.update({w: 10 * k for k, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(),
                                                         start=2)})
_GERMAN_VALUES = {m: v for v, m in enumerate(GERMAN_MORPHEMES[:20])} | {"ein": 1}
_GERMAN_VALUES.update({m: 10 * k for k, m in enumerate(GERMAN_MORPHEMES[20:28], start=2)})
# Tokens with a counterpart in the other language: the numerals, the two multipliers, and the link between units and
# tens (English "-", German "und"). English "and" and "," have none.
_MULTIPLIERS = {"hundred": "hundred", "thousand": "thousand", "hundert": "hundred", "tausend": "thousand"}
_LINKS = {"-", "und"}


def _alignment_keys(tokens: Sequence[str], values: dict[str, int], lang: str) -> list[tuple | None]:
    """A key per token that names its role in the number: (group, kind, value), ``None`` for a token with no
    counterpart. ``group`` is 1 before "thousand" and 0 after it; a numeral directly before "hundred" is the
    hundreds digit (kind "h"), any other numeral a unit, teen or ten (kind "n")."""
    try:
        thousand = next(i for i, t in enumerate(tokens) if _MULTIPLIERS.get(t) == "thousand")
    except StopIteration:
        thousand = len(tokens)
    keys: list[tuple | None] = []
    for i, token in enumerate(tokens):
        group = 1 if i < thousand else 0
        if token in values:
            before_hundred = i + 1 < len(tokens) and _MULTIPLIERS.get(tokens[i + 1]) == "hundred"
            keys.append((group, "h" if before_hundred else "n", values[token]))
        elif token in _MULTIPLIERS:
            keys.append((group if _MULTIPLIERS[token] == "hundred" else 0, _MULTIPLIERS[token], None))
        elif token in _LINKS:
            keys.append((group, "link", None))
        elif lang == "en" and token in {"and", ","}:
            keys.append(None)
        else:
            raise ValueError(f"cannot align the {lang} token {token!r}: not a number word of the task")
    return keys


def gold_alignment(source_tokens: Sequence[str], target_tokens: Sequence[str], lang: str = "de") -> list[int]:
    """The gold word alignment of an English number and its German translation, derived from the grammar.

    Each German morpheme is linked to the one English token that plays its role: the same numeral in the same
    place (``drei`` of ``dreihundert`` to the ``three`` before ``hundred``; ``vier`` of ``vierundfünfzig`` to the
    ``four`` after the hyphen), ``hundert`` and ``tausend`` to ``hundred`` and ``thousand``, and the ``und`` that
    joins units and tens to the hyphen that joins them in English. English ``and`` and ``,`` have no counterpart.
    The links cross wherever German says the units before the tens.

    Args:
        source_tokens: the English tokens (:func:`tokenize` with ``"en"``, without ``<eos>``).
        target_tokens: the German tokens (morphemes, without ``<eos>``).
        lang: the target language; only ``"de"`` is supported (French counts in twenties: ``quatre-vingt-dix``
            has no word-by-word counterpart of ``ninety``).

    Returns:
        For each target token, the index of its source token: e.g. ``gold_alignment(["fifty", "-", "four"],
        ["vier", "und", "fünfzig"]) == [2, 1, 0]``.

    Raises:
        ValueError: for another language, or tokens that are not a number of the task and its translation.
    """
    if lang != "de":
        raise ValueError(f"lang: only 'de' has a word-by-word gold alignment here, got {lang!r}")
    source = _alignment_keys(source_tokens, _ENGLISH_VALUES, "en")
    target = _alignment_keys(target_tokens, _GERMAN_VALUES, "de")
    where = {}
    for j, key in enumerate(source):
        if key is not None:
            if key in where:
                raise ValueError(f"cannot align {list(source_tokens)}: two tokens play the role {key}")
            where[key] = j
    links = []
    for token, key in zip(target_tokens, target):
        if key not in where:
            raise ValueError(f"cannot align the German {token!r} of {list(target_tokens)} with "
                             f"{list(source_tokens)}: no English token plays its role")
        links.append(where[key])
    if len(set(links)) != len(links) or len(links) != len(where):
        raise ValueError(f"{list(target_tokens)} and {list(source_tokens)} are not a number and its translation")
    return links


# --------------------------------------------------------------------------------------------------------------
# Vocabulary and batches
# --------------------------------------------------------------------------------------------------------------

class Vocab:
    """A closed vocabulary: token strings <-> integer ids, with padding, begin- and end-of-sequence tokens.

    The ids ``0, 1, 2`` are ``<pad>``, ``<bos>`` and ``<eos>``; the tokens follow in the order given. There is no
    unknown token: the task's vocabulary is closed, and an unseen token is an error, not something to hide.

    Args:
        tokens: the distinct non-special tokens.

    Raises:
        ValueError: for duplicate tokens, empty strings or special tokens among ``tokens``.
    """

    PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
    SPECIALS = (PAD, BOS, EOS)
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, tokens: Iterable[str]):
        tokens = list(tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must be distinct")
        bad = [t for t in tokens if not isinstance(t, str) or not t or t in self.SPECIALS]
        if bad:
            raise ValueError(f"tokens must be non-empty strings other than {self.SPECIALS}, got {bad[:5]}")
        self.itos: list[str] = [*self.SPECIALS, *tokens]
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]]) -> Vocab:
        """The vocabulary of every token in ``token_lists``, sorted (so that it does not depend on their order)."""
        return cls(sorted({t for tokens in token_lists for t in tokens}))

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {' '.join(self.itos[:12])}{' ...' if len(self) > 12 else ''})"

    def encode(self, tokens: Sequence[str], bos: bool = False, eos: bool = True) -> list[int]:
        """Token strings -> ids, optionally with ``<bos>`` first and ``<eos>`` last (the default).

        Raises:
            ValueError: for a token not in the vocabulary (or a special token written out).
        """
        ids = []
        for t in tokens:
            i = self.stoi.get(t)
            if i is None or t in self.SPECIALS:
                raise ValueError(f"token {t!r} is not in the vocabulary {self!r}")
            ids.append(i)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Ids -> token strings, up to the first ``<eos>`` (excluded); ``<bos>`` and ``<pad>`` are skipped.

        Raises:
            ValueError: for an id outside ``[0, len(self))``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < len(self):
                raise ValueError(f"id {i} is outside the vocabulary [0, {len(self)})")
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.itos[i])
        return out

    def pad(self, sequences: Sequence[Sequence[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id sequences to one length with ``<pad>``.

        Args:
            sequences: ``B`` non-empty lists of ids.
            length: the padded length ``T`` (default: the longest sequence).

        Returns:
            ``ids`` ``(B, T)`` int64 and ``lengths`` ``(B,)`` int64 (the number of real ids of each row).

        Raises:
            ValueError: for no sequences, an empty sequence, or a sequence longer than ``length``.
        """
        if len(sequences) == 0:
            raise ValueError("sequences must not be empty")
        lengths = [len(s) for s in sequences]
        if min(lengths) == 0:
            raise ValueError("every sequence must hold at least one id")
        length = max(lengths) if length is None else length
        if max(lengths) > length:
            raise ValueError(f"a sequence of length {max(lengths)} does not fit in length={length}")
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        for row, s in enumerate(sequences):
            ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        return ids, torch.tensor(lengths, dtype=torch.long)


@dataclass
class Seq2SeqBatch:
    """A padded batch for a sequence-to-sequence model (``B`` examples, ``S`` source and ``T`` target positions).

    Attributes:
        src: ``(B, S)`` int64 source ids, ``<eos>``-terminated, padded with ``<pad>`` (id 0).
        src_lengths: ``(B,)`` int64, the number of real source ids (``<eos>`` included).
        tgt_in: ``(B, T)`` int64 decoder inputs ``<bos> y_1 ... y_n`` (teacher forcing), padded.
        tgt_out: ``(B, T)`` int64 targets ``y_1 ... y_n <eos>``, padded: ``tgt_out[:, t]`` is what the decoder must
            predict after reading ``tgt_in[:, :t + 1]``.
        tgt_lengths: ``(B,)`` int64, ``n + 1``.
        src_tokens: the source tokens of each example, for labels in plots (``<eos>`` not included).
        pairs: the examples.
    """

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tgt_lengths: torch.Tensor
    src_tokens: list[list[str]]
    pairs: list[NumberPair]

    def __len__(self) -> int:
        return self.src.shape[0]

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        """The same batch with its tensors on ``device``."""
        move = {k: getattr(self, k).to(device) for k in ("src", "src_lengths", "tgt_in", "tgt_out", "tgt_lengths")}
        return Seq2SeqBatch(**move, src_tokens=self.src_tokens, pairs=self.pairs)


class NumberTranslation:
    """The number-translation task in one object: the split pairs, the vocabularies and batches of tensors.

    Args:
        lang: the target language (``"de"`` or ``"fr"``).
        split: a :class:`NumberSplit` of disjoint numbers.
        src_lang: the source language (default ``"en"``).

    Attributes:
        train, valid, test: lists of :class:`NumberPair`.
        src_vocab, tgt_vocab: :class:`Vocab` built from the **training** pairs only.

    Raises:
        ValueError: for bad languages or numbers, splits that overlap, or a validation or test pair with a token
            the training pairs never show (the model could not produce it; draw more training numbers).
    """

    def __init__(self, lang: str, split: NumberSplit, src_lang: str = "en"):
        train, valid, test = (list(s) for s in split)
        if set(train) & set(valid) or set(train) & set(test) or set(valid) & set(test):
            raise ValueError("the train, valid and test numbers must be disjoint")
        if not train:
            raise ValueError("the training split must not be empty")
        self.lang, self.src_lang = lang, src_lang
        self.train, self.valid, self.test = (make_number_pairs(lang, s, src_lang) for s in (train, valid, test))
        self.src_vocab = Vocab.build(self.source_tokens(p) for p in self.train)
        self.tgt_vocab = Vocab.build(self.target_tokens(p) for p in self.train)
        for name, pairs in (("valid", self.valid), ("test", self.test)):
            for p in pairs:
                for vocab, tokens in ((self.src_vocab, self.source_tokens(p)), (self.tgt_vocab, self.target_tokens(p))):
                    unseen = [t for t in tokens if t not in vocab]
                    if unseen:
                        raise ValueError(f"{name} pair {p} has tokens {unseen} that no training pair has")

    @classmethod
    def from_numbers(cls, lang: str, numbers: Iterable[int], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0, src_lang: str = "en") -> NumberTranslation:
        """Split ``numbers`` with :func:`split_numbers` and build the task."""
        return cls(lang, split_numbers(numbers, fractions, seed), src_lang)

    def __repr__(self) -> str:
        return (f"NumberTranslation({self.src_lang}->{self.lang}: {len(self.train)} train, {len(self.valid)} valid, "
                f"{len(self.test)} test pairs; vocabularies {len(self.src_vocab)} and {len(self.tgt_vocab)})")

    def source_tokens(self, pair: NumberPair) -> list[str]:
        return tokenize(pair.source, self.src_lang)

    def target_tokens(self, pair: NumberPair) -> list[str]:
        return tokenize(pair.target, self.lang)

    def source_length(self, pair: NumberPair) -> int:
        """The number of source tokens (without ``<eos>``): the x-axis of the chapter's length plots."""
        return len(self.source_tokens(pair))

    def batch(self, pairs: Sequence[NumberPair]) -> Seq2SeqBatch:
        """Encode and pad ``pairs`` (see :class:`Seq2SeqBatch`)."""
        if len(pairs) == 0:
            raise ValueError("pairs must not be empty")
        src_tokens = [self.source_tokens(p) for p in pairs]
        src, src_lengths = self.src_vocab.pad([self.src_vocab.encode(t) for t in src_tokens])
        tgt = [self.tgt_vocab.encode(self.target_tokens(p)) for p in pairs]  # y_1 ... y_n <eos>
        tgt_out, tgt_lengths = self.tgt_vocab.pad(tgt)
        tgt_in, _ = self.tgt_vocab.pad([[self.tgt_vocab.bos_id] + t[:-1] for t in tgt])
        return Seq2SeqBatch(src, src_lengths, tgt_in, tgt_out, tgt_lengths, src_tokens, list(pairs))

    def decode_target(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Predicted target ids -> the target string (up to the first ``<eos>``)."""
        return detokenize(self.tgt_vocab.decode(ids), self.lang)
