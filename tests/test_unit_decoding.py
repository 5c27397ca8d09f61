"""
`EchoXProcessor.decode_units` against a port of the released EchoX's decoding (`get_unit_result` of its streaming
assistant), on unit vocabularies whose pieces split unit ids (digit-leading pieces after a word marker) and on
EchoX-mini's spelling; and `generate` / `stream` reading the echo decoder's output through it.
"""

import random
import re

import pytest
import torch
from transformers import WhisperFeatureExtractor

from modeling_echox import EchoXProcessor
from modeling_echox.model.unit_vocabulary import EchoXUnitVocabulary
from modeling_echox.testing.random_checkpoint import build_random_echox
from modeling_echox.testing.tiny_tokenizer import build_tiny_tokenizer

NUM_UNITS = 1000


def released_unit_result(tokenizer_with_unit_tokens, output_ids) -> list[int]:
    """
    The released decoding, step by step: the tokenizer (which holds the `<|unit_...|>` tokens) decodes the echo
    decoder's output; if "▁" occurs, the unit payloads are joined with '' ; every run of digits is a unit; units
    ≥ 1000 are dropped; the survivors are joined with ' ' and split again into ints for the vocoder.
    """
    unit_output = tokenizer_with_unit_tokens.batch_decode([output_ids])[0]
    if "▁" in unit_output:
        unit_output = "".join(re.findall(r"<\|unit_(.*?)\|>", unit_output))
    units = re.findall(r"\d+", unit_output)
    new_units = []
    for unit in units:
        if int(unit) < NUM_UNITS:
            new_units.append(unit)
    units = " ".join(new_units)
    return list(map(int, units.split(" "))) if units else []


def splitting_vocabulary(seed: int, size: int = 40) -> EchoXUnitVocabulary:
    """Pieces cut anywhere in "_"-joined unit strings, as a SentencePiece over unit *text* makes them."""
    rng = random.Random(seed)
    pieces = {"▁837_8", "1_194", "▁902_8", "19", "▁5", "05_", "7"}
    while len(pieces) < size:
        text = "_".join(str(rng.randrange(NUM_UNITS)) for _ in range(rng.randint(1, 3)))
        cut = text[rng.randrange(len(text)) :] if rng.random() < 0.5 else text
        pieces.add(("▁" if rng.random() < 0.4 else "") + cut)
    return EchoXUnitVocabulary(sorted(pieces))


def processors(vocabulary: EchoXUnitVocabulary):
    """Ours (unit tokens after the tokenizer's ids) and the released layout's tokenizer (unit tokens added to it)."""
    tokenizer = build_tiny_tokenizer()
    offset = len(tokenizer)
    ours = EchoXProcessor(
        WhisperFeatureExtractor(feature_size=80),
        tokenizer,
        unit_vocabulary=vocabulary,
        unit_token_offset=offset,
        num_units=NUM_UNITS,
    )
    released = build_tiny_tokenizer()
    released.add_tokens(vocabulary.tokens, special_tokens=False)
    assert released.convert_tokens_to_ids(vocabulary.token(0)) == offset
    return ours, released, offset


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_units_equals_the_released_rule_on_splitting_vocabularies(seed):
    vocabulary = splitting_vocabulary(seed)
    assert vocabulary.splits_units
    ours, released, offset = processors(vocabulary)
    text_ids = ours.tokenizer("12 apples and 7", add_special_tokens=False)["input_ids"]
    eot = ours.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    rng = random.Random(seed)
    checked_fused = False
    for _ in range(200):
        sequence = [offset + rng.randrange(len(vocabulary)) for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.3:
            sequence.insert(rng.randint(0, len(sequence)), rng.choice(text_ids))
        sequence.append(eot)
        expected = released_unit_result(released, sequence)
        assert ours.decode_units(sequence) == expected, [vocabulary.pieces[i - offset] for i in sequence if i >= offset]
        assert ours.decode_units(torch.tensor(sequence)) == expected
        per_piece = [u for i in sequence if i >= offset for u in vocabulary.units_of(i - offset) if u < NUM_UNITS]
        checked_fused |= expected != per_piece
    assert checked_fused  # some sequences read differently joined than piece by piece


def test_the_issue_example():
    vocabulary = EchoXUnitVocabulary(["▁837_8", "1_194"])
    ours, released, offset = processors(vocabulary)
    assert ours.decode_units([offset, offset + 1]) == released_unit_result(released, [offset, offset + 1]) == [837, 81, 194]


def test_word_marker_free_vocabulary_reads_each_token_and_text_digits():
    vocabulary = EchoXUnitVocabulary.from_num_units(NUM_UNITS)
    assert not vocabulary.splits_units
    ours, released, offset = processors(vocabulary)
    digits = ours.tokenizer("42", add_special_tokens=False)["input_ids"]
    sequence = [offset + 12, offset + 3, *digits, offset + 999]
    assert ours.decode_units(sequence) == released_unit_result(released, sequence) == [12, 3, 42, 999]


def test_mini_spelling_reads_the_same_joined_and_per_piece():
    """EchoX-mini's unit language writes "_" in front of non-initial pieces, so the released rule and the unit table agree."""
    from modeling_echox.mini.assembly import MINI_PARTS_DIR

    vocabulary = EchoXUnitVocabulary.from_file(f"{MINI_PARTS_DIR}/unit_vocab.txt")
    assert not vocabulary.splits_units
    ours, released, offset = processors(vocabulary)
    table = vocabulary.to_unit_table(NUM_UNITS)
    rng = random.Random(0)
    for _ in range(100):
        rows = [rng.randrange(len(vocabulary)) for _ in range(rng.randint(1, 15))]
        sequence = [offset + row for row in rows]
        units = table[torch.tensor(rows)].flatten()
        assert ours.decode_units(sequence) == released_unit_result(released, sequence) == units[units >= 0].tolist()


def test_generate_and_stream_read_units_with_the_processor(monkeypatch):
    vocabulary = splitting_vocabulary(0, size=64)
    model, processor = build_random_echox(unit_vocabulary=vocabulary, num_units=NUM_UNITS)
    model.config.unit_pieces_split_units = vocabulary.splits_units
    assert processor.unit_token_offset == model.config.unit_token_offset
    inputs = processor(text="hello there", return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, segmentation_mode="faithful")

    with pytest.raises(ValueError, match="splits unit ids across tokens"):
        model.generate(**inputs, **kwargs)

    calls = []
    decode = processor.decode_units

    def spy(ids):
        calls.append(decode(ids))
        return calls[-1]

    monkeypatch.setattr(processor, "decode_units", spy)
    output = model.generate(**inputs, processor=processor, **kwargs)
    assert calls and output.segment_unit_ids[0] == [units for units in calls if units is not None][: len(output.segment_unit_ids[0])]
    streamed = list(model.stream(**inputs, processor=processor, **kwargs))
    assert [unit for chunk in streamed for unit in chunk.unit_ids] == output.unit_ids[0]
    assert torch.allclose(torch.cat([torch.from_numpy(chunk.audio) for chunk in streamed]), output.waveforms[0])
