"""The spelling echo decoder (`echo_config.spelling_length`): token spelling table, byte positions, training and inference."""

import numpy as np
import pytest
import torch

from modeling_echox import EchoXForSpeechToSpeech
from modeling_echox.testing.random_checkpoint import build_random_echox

SR = 16000
SPELLING = 6


@pytest.fixture(scope="module")
def spelled():
    model, processor = build_random_echox("tiny", seed=4, echo_spelling_length=SPELLING)
    return model, processor


def _spelling(model, token_id):
    row = model.echo_decoder.token_spelling[token_id]
    return bytes(row[row > 0].tolist())


def test_table_holds_each_tokens_lowercase_bytes(spelled):
    model, processor = spelled
    tokenizer = processor.tokenizer
    for text in [" Nairobi", " capital", "Monday"]:
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            expected = tokenizer.decode([token]).lower().encode()[:SPELLING]
            assert _spelling(model, token) == expected
    assert any(len(tokenizer.decode([i]).encode()) > SPELLING for i in range(len(tokenizer)))  # the cut is exercised
    for special in tokenizer.all_special_ids:
        assert _spelling(model, special) == b""


def test_each_byte_is_one_position_in_order(spelled):
    model, processor = spelled
    decoder = model.echo_decoder
    ids = torch.tensor(processor.tokenizer(" is nairobi", add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id])
    vectors = torch.randn(len(ids), model.config.text_config.hidden_size)
    rows = decoder.spell(vectors, ids)
    expected = []
    for vector, token in zip(vectors, ids.tolist()):
        spelled_bytes = _spelling(model, token)
        if not spelled_bytes:  # a token with no bytes (here the special eos) keeps its own vector
            expected.append(vector)
        expected += [vector + decoder.byte_embedding.weight[b] for b in spelled_bytes]
    assert torch.allclose(rows, torch.stack(expected))


def test_the_decoder_reads_the_spelling(spelled):
    model, processor = spelled
    decoder, table = model.echo_decoder, model.text_table
    vectors = torch.randn(2, model.config.text_config.hidden_size)
    first, second = (torch.tensor(processor.tokenizer(t, add_special_tokens=False).input_ids[:1] * 2) for t in (" ab", " xy"))
    logits = [decoder(decoder.segment_embeddings(vectors, table, token_ids=ids)[None])[0][0, -1] for ids in (first, second)]
    assert not torch.allclose(logits[0], logits[1])  # same vectors, different letters: different units


def test_missing_token_ids_or_table_raise(spelled):
    model, _ = spelled
    segment = torch.randn(3, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="token ids"):
        model.echo_decoder.generate([segment], model.text_table)
    empty = build_random_echox("tiny", seed=3, echo_spelling_length=SPELLING)[0]
    empty.echo_decoder.token_spelling.zero_()
    with pytest.raises(ValueError, match="set_token_spelling"):
        empty.echo_decoder.generate([segment], empty.text_table, token_ids=[torch.tensor([5, 6, 7])])
    plain = build_random_echox("tiny", seed=3)[0]
    with pytest.raises(ValueError, match="spelling_length"):
        plain.echo_decoder.set_token_spelling(None)


def test_text_to_codec_training_reaches_the_byte_embedding(spelled):
    model, processor = spelled
    tokenizer, config = processor.tokenizer, model.config
    ids = tokenizer("the capital of kenya", add_special_tokens=False).input_ids
    echo_text_ids = torch.tensor([[ids]])
    units = torch.tensor([[[config.unit_token_offset + 1, config.unit_token_offset + 2, config.echo_config.unit_eos_token_id]]])
    model.zero_grad(set_to_none=True)
    output = model(echo_text_ids=echo_text_ids, unit_labels=units)
    output.loss.backward()
    grad = model.echo_decoder.byte_embedding.weight.grad
    used = sorted({b for token in ids for b in _spelling(model, token)})
    assert torch.isfinite(output.loss) and grad[used].abs().sum(-1).gt(0).all()
    assert grad[[b for b in range(256) if b not in used]].abs().sum() == 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("decoder_type, seed", [("autoregressive", 4), ("ctc", 0)])  # seeds whose speech is not empty
def test_streamed_speech_equals_generate_and_the_decoder_survives_saving(decoder_type, seed, tmp_path):
    model, processor = build_random_echox("tiny", seed=seed, echo_spelling_length=SPELLING, echo_decoder_type=decoder_type)
    rng = np.random.default_rng(0)
    inputs = processor(audio=(0.05 * rng.standard_normal(SR * 2)).astype(np.float32), sampling_rate=SR)
    tokenizer = processor.tokenizer
    reference = model.generate(**inputs, tokenizer=tokenizer, segmentation_mode="fast", max_new_tokens=24)
    assert sum(len(units) for units in reference.segment_unit_ids[0]) > 0
    chunks = list(model.stream(**inputs, tokenizer=tokenizer, segmentation_mode="fast", max_new_tokens=24))
    assert [chunk.unit_ids for chunk in chunks] == reference.segment_unit_ids[0]
    model.save_pretrained(tmp_path)
    loaded = EchoXForSpeechToSpeech.from_pretrained(tmp_path).eval()
    assert loaded.config.echo_config.spelling_length == SPELLING and loaded.config.echo_config.decoder_type == decoder_type
    assert hasattr(loaded.echo_decoder, "unit_embedding") == (decoder_type == "autoregressive")  # CTC writes no units back
    assert torch.equal(loaded.echo_decoder.token_spelling, model.echo_decoder.token_spelling)
    again = loaded.generate(**inputs, tokenizer=tokenizer, segmentation_mode="fast", max_new_tokens=24)
    assert again.segment_unit_ids == reference.segment_unit_ids
