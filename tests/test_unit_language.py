"""The unit language: SentencePiece over unit characters, EchoX piece format, lossless round trips."""

import random

import numpy as np
import pytest
import torch

from modeling_echox.model.unit_vocabulary import WORD_MARKER, EchoXUnitVocabulary
from modeling_echox.units.unit_language import (
    UNIT_LANGUAGE_MODEL_FILE,
    EchoXUnitLanguage,
    char_to_unit,
    compression_report,
    train_unit_language,
    unit_to_char,
)

K = 60


def dedup(seq):
    return [u for i, u in enumerate(seq) if i == 0 or u != seq[i - 1]]


def corpus(num: int = 150, seed: int = 0, num_units: int = K, common: int = 40):
    """Utterances built from a small lexicon of unit "words" over units 0 … common-1 (the rest never occur)."""
    lexicon_rng = random.Random(0)  # one fixed lexicon; `seed` picks the utterances
    lexicon = [[lexicon_rng.randrange(common) for _ in range(lexicon_rng.randint(2, 6))] for _ in range(30)]
    rng = random.Random(seed)
    utterances = []
    for _ in range(num):
        seq = []
        for _ in range(rng.randint(4, 25)):
            seq += rng.choice(lexicon)
        utterances.append(dedup(seq))
    return utterances


@pytest.fixture(scope="module")
def unigram():
    return train_unit_language(corpus(), 150, num_units=K)


@pytest.fixture(scope="module")
def bpe():
    return train_unit_language(corpus(), 150, "bpe", num_units=K)


def test_unit_characters_round_trip():
    for unit in (0, 1, 999, 6399, 6400, 20000):
        assert char_to_unit(unit_to_char(unit)) == unit
    with pytest.raises(ValueError):
        unit_to_char(-1)
    with pytest.raises(ValueError):
        char_to_unit("a")


@pytest.mark.parametrize("name", ["unigram", "bpe"])
def test_round_trip_is_lossless(name, request):
    language = request.getfixturevalue(name)
    assert len(language) == 150 and language.num_units == K
    rng = random.Random(1)
    sequences = corpus(20, seed=5)
    sequences += [[rng.randrange(K) for _ in range(rng.randint(1, 300))] for _ in range(20)]  # random, incl. rare
    sequences += [[K - 1], [K - 1, K - 2, K - 1] * 5, list(range(K)), [3, 3, 3, 7]]  # unseen units, repeats
    for seq in sequences:
        indices = language.encode(seq)
        assert language.decode(indices) == seq
        assert all(0 <= i < len(language) for i in indices)
    assert language.encode([]) == [] and language.decode([]) == []
    assert language.decode(torch.tensor(language.encode(np.array([1, 2, 3])))) == [1, 2, 3]


def test_compression_on_structured_data(unigram, bpe):
    for language in (unigram, bpe):
        seqs = corpus(30, seed=9)
        units = sum(len(s) for s in seqs)
        tokens = sum(len(language.encode(s)) for s in seqs)
        assert tokens < 0.6 * units  # the lexicon's "words" become pieces
        assert language.max_piece_length > 1
    assert unigram.model_type == "unigram" and bpe.model_type == "bpe"


def test_piece_format_and_echox_decoding_rule(unigram):
    vocabulary = unigram.to_vocabulary()
    assert isinstance(vocabulary, EchoXUnitVocabulary) and len(vocabulary) == len(unigram)
    assert sum(vocabulary.counts) > 0
    assert not vocabulary.splits_units
    for piece in vocabulary.pieces:
        assert piece.startswith((WORD_MARKER, "_")), piece  # word-initial "▁", else "_": never a digit first
        body = piece[1:]
        assert WORD_MARKER not in body
        if body:
            assert all(part.isdigit() for part in body.split("_")), piece
        else:
            assert piece == WORD_MARKER
    # every single unit is a piece, so every unit is representable
    singles = {int(p[1:]) for p in vocabulary.pieces if p[1:].isdigit()}
    assert singles == set(range(K))
    for seq in corpus(10, seed=3) + [[K - 1, 0, K - 2]]:
        tokens = unigram.tokens(seq)
        assert tokens[0].startswith(f"<|unit_{WORD_MARKER}")  # the utterance's first piece is word-initial
        assert all(token.startswith("<|unit_") and token.endswith("|>") for token in tokens)
        assert vocabulary.decode_text("".join(tokens), K) == seq  # the original EchoX rule
        # the same tokens through the model's unit table
        table = vocabulary.to_unit_table(K)
        rows = table[torch.tensor(unigram.encode(seq))].flatten()
        assert rows[rows >= 0].tolist() == seq
    assert table.shape[1] == unigram.max_piece_length


def test_multi_unit_piece_example(unigram):
    multi = [i for i, p in enumerate(unigram.pieces) if p.count("_") >= 2]
    assert multi
    piece = unigram.pieces[multi[0]]
    units = unigram.units_of(multi[0])
    assert piece[1:] == "_".join(map(str, units)) and piece[0] in (WORD_MARKER, "_")
    assert EchoXUnitVocabulary([piece]).decode_text(f"<|unit_{piece}|>", K) == units


def test_save_and_load(unigram, tmp_path):
    files = unigram.save_pretrained(tmp_path)
    assert (tmp_path / UNIT_LANGUAGE_MODEL_FILE).is_file() and len(files) == 2
    loaded = EchoXUnitLanguage.from_pretrained(tmp_path)
    assert loaded.pieces == unigram.pieces and loaded.num_units == K and loaded.counts == unigram.counts
    seq = corpus(1, seed=11)[0]
    assert loaded.encode(seq) == unigram.encode(seq)
    (tmp_path / "unit_language.json").unlink()  # K is recovered from the model alone
    assert EchoXUnitLanguage.from_pretrained(tmp_path).num_units == K
    vocabulary_file = unigram.to_vocabulary().save_pretrained(str(tmp_path))
    assert EchoXUnitVocabulary.from_file(vocabulary_file).pieces == unigram.pieces
    with pytest.raises(OSError):
        EchoXUnitLanguage.from_pretrained(tmp_path / "missing")


def test_long_utterances_are_chunked_for_training():
    rng = random.Random(4)
    long = dedup([rng.randrange(20) for _ in range(5000)])
    language = train_unit_language([long], 40, num_units=20, chunk_length=500, hard_vocab_limit=False)
    assert language.decode(language.encode(long)) == long


def test_compression_report(unigram):
    seqs = corpus(10, seed=2)
    report = compression_report(unigram, seqs, [2.0] * 10)
    units = sum(map(len, seqs))
    assert report["units"] == units and report["seconds"] == 20.0
    assert report["units_per_second"] == pytest.approx(units / 20.0, rel=1e-3)
    assert report["tokens"] == sum(len(unigram.encode(s)) for s in seqs)
    assert report["tokens_per_unit"] == pytest.approx(report["tokens"] / units, rel=1e-3)
    assert report["tokens_per_second"] == pytest.approx(report["tokens"] / 20.0, rel=1e-3)
    with pytest.raises(ValueError, match="entries"):
        compression_report(unigram, seqs, [1.0])
    with pytest.raises(ValueError, match="positive"):
        compression_report(unigram, seqs, 0.0)


def test_bad_inputs(unigram):
    with pytest.raises(ValueError, match="outside"):
        unigram.encode([0, K])
    with pytest.raises(ValueError, match="outside"):
        unigram.encode([-1])
    with pytest.raises(ValueError, match="integer"):
        unigram.encode([0.5, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        unigram.encode([[1, 2]])
    with pytest.raises(ValueError, match="outside"):
        unigram.decode([len(unigram)])
    with pytest.raises(ValueError, match="model_type"):
        train_unit_language(corpus(5), 100, "wordpiece", num_units=K)
    with pytest.raises(ValueError, match="at least num_units"):
        train_unit_language(corpus(5), K, num_units=K)
    with pytest.raises(ValueError, match="non-empty list"):
        train_unit_language([], 100)
    with pytest.raises(ValueError, match="no units"):
        train_unit_language([[], []], 100, num_units=K)
    with pytest.raises(ValueError, match="outside"):
        train_unit_language([[1, 2, K]], 100, num_units=K)
    with pytest.raises(ValueError, match="supports at most"):
        train_unit_language(corpus(5), 5000, num_units=K)
