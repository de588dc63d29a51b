"""tfcourse.data.shakespeare: the offline corpus, the split by play, speeches, tokenizers and LM batches."""

import pytest
import torch

from tfcourse.data import shakespeare as sh


def test_the_corpus_has_its_42_works_37_plays_and_titles():
    assert len(sh.WORKS) == 42 and len(sh.PLAYS) == 37
    assert set(sh.POEMS) <= set(sh.WORKS) and not set(sh.POEMS) & set(sh.PLAYS)
    assert sh.title("lear") == "King Lear"
    assert "To be, or not to be" in sh.load_text("hamlet")
    total = sum(len(text) for text in sh.load_corpus().values())
    assert 5_000_000 < total < 5_200_000  # DATA.md: 5.06 M characters


def test_play_split_is_a_partition_of_the_plays():
    split = sh.play_split()
    together = split.train + split.valid + split.test
    assert sorted(together) == sorted(sh.PLAYS) and len(set(together)) == len(together)
    assert "hamlet" in split.test and "hamlet" not in split.train


@pytest.mark.parametrize("kwargs, match", [
    (dict(valid=("hamlet",), test=("hamlet",)), "disjoint"),
    (dict(valid=("sonnets",)), "poem"),
    (dict(test=("hamlett",)), "test: unknown work"),
])
def test_play_split_rejects_bad_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sh.play_split(**kwargs)


def test_every_play_parses_into_speeches_without_stage_directions():
    for play in sh.PLAYS:
        found = sh.speeches(play)
        text = sh.load_text(play)
        assert len(found) > 400, play
        # most of a play's characters are dialogue (the rest: headings, lists of persons, stage directions)
        assert sum(len(s.text) for s in found) > 0.6 * len(text), play
        assert all(s.play == play and s.text and "[" not in s.text and "]" not in s.text for s in found)
        assert all(len(s.speaker.split()) <= 5 for s in found)
    first = sh.speeches("hamlet")[:2]
    assert [(s.speaker, s.text) for s in first] == [("Ber", "Who's there?"),
                                                    ("Fran", "Nay, answer me: stand, and unfold yourself.")]
    assert sh.speeches("midsummer_nights_dream")[0].speaker == "THESEUS"  # capitals without a full stop
    with pytest.raises(ValueError, match="poem"):
        sh.speeches("sonnets")


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    text = sh.load_text("macbeth")
    tok = sh.CharTokenizer.build(text)
    assert tok.vocab_size == len(set(text))
    ids = sh.encode_text(text[:5000], tok)
    assert ids.dtype == torch.long and tok.decode(ids) == text[:5000]
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("\u00e9")


def test_bpe_is_lossless_deterministic_and_compresses():
    texts = [sh.load_text(p) for p in ("macbeth", "tempest")]
    a, b = sh.train_bpe(texts, vocab_size=600), sh.train_bpe(texts, vocab_size=600)
    assert a.get_vocab() == b.get_vocab() and a.get_vocab_size() == 600
    sample = sh.load_text("hamlet")[10_000:12_000]  # a play the tokenizer has not seen
    ids = sh.encode_text(sample, a)
    assert a.decode(ids.tolist()) == sample
    assert len(ids) < 0.6 * len(sample)  # merges: fewer tokens than bytes
    assert a.token_to_id("<|endoftext|>") == 0


def test_wordpiece_has_bert_specials_and_pair_template():
    tok = sh.train_wordpiece([sh.load_text("macbeth")], vocab_size=1000)
    assert [tok.token_to_id(t) for t in sh.BERT_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    enc = tok.encode("Is this a dagger", "which I see before me?")
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2
    first_sep = enc.tokens.index("[SEP]")
    assert set(enc.type_ids[: first_sep + 1]) == {0} and set(enc.type_ids[first_sep + 1:]) == {1}
    assert all(t == t.lower() for t in enc.tokens if not t.startswith("["))
    assert any(t.startswith("##") for t in tok.encode("unthinkable murderousness").tokens)


def test_lm_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(100)
    x, y = sh.lm_batch(data, block_size=8, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8)
    torch.testing.assert_close(y, x + 1)
    assert int(y.max()) <= 99
    x2, _ = sh.lm_batch(data, 8, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x2)


@pytest.mark.parametrize("args, match", [
    ((torch.arange(5), 8, 2), "fewer than block_size"),
    ((torch.rand(100), 8, 2), "1-D integer tensor"),
    ((torch.arange(100), 0, 2), "block_size must be"),
    ((torch.arange(100), 8, -1), "batch_size must be"),
])
def test_lm_batch_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        sh.lm_batch(*args)


def test_unknown_work_and_bad_types():
    with pytest.raises(ValueError, match="name: unknown work"):
        sh.load_text("hamlett")
    with pytest.raises(TypeError, match="tokenizer must be"):
        sh.encode_text("abc", object())
    with pytest.raises(ValueError, match="vocab_size"):
        sh.train_bpe(["abc"], vocab_size=10)
