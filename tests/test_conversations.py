"""Conversations (earlier turns kept, as the released EchoX keeps them) through generate, stream and the pipeline."""

import numpy as np
import pytest
import torch

import modeling_echox  # noqa: F401  (registers the task)

SR = 16000


def noise(seconds, seed):
    return (0.05 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def conversation(first_clip, second_clip):
    return [
        {"role": "user", "content": [{"type": "audio", "audio": {"array": first_clip, "sampling_rate": SR}}]},
        {"role": "assistant", "content": "the capital of france is paris"},
        {"role": "user", "content": [{"type": "audio", "audio": {"array": second_clip, "sampling_rate": SR}},
                                     {"type": "text", "text": "answer briefly"}]},
    ]


def test_generate_takes_a_conversation(speech_to_speech):
    model, processor = speech_to_speech.model, speech_to_speech.processor
    turns = conversation(noise(1.0, 0), noise(1.5, 1))
    inputs = processor(conversation=turns)
    assert inputs["input_features"].shape[0] == 2
    expected = model.generate(**inputs, processor=processor, max_new_tokens=8)
    output = model.generate(conversation=turns, processor=processor, max_new_tokens=8)
    assert torch.equal(output.sequences, expected.sequences) and output.unit_ids == expected.unit_ids
    torch.testing.assert_close(output.waveforms[0], expected.waveforms[0])
    # the earlier turns count: the last question alone is another prompt
    alone = processor(conversation=turns[2:])
    assert alone["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    streamed = list(model.stream(conversation=turns, processor=processor, max_new_tokens=8, timeout=120))
    assert "".join(chunk.text for chunk in streamed) == output.text[0]


def test_generate_conversation_errors(speech_to_speech):
    model, processor = speech_to_speech.model, speech_to_speech.processor
    turns = conversation(noise(1.0, 0), noise(1.0, 1))
    with pytest.raises(ValueError, match="needs `processor=`"):
        model.generate(conversation=turns)
    inputs = processor(text="hello")
    with pytest.raises(ValueError, match="either `conversation` or"):
        model.generate(conversation=turns, processor=processor, input_ids=inputs["input_ids"])


def test_pipeline_takes_conversations(speech_to_speech):
    turns = conversation(noise(1.0, 2), noise(1.0, 3))
    model, processor = speech_to_speech.model, speech_to_speech.processor
    answer = speech_to_speech(turns, max_new_tokens=8)
    expected = model.generate(conversation=turns, processor=processor, max_new_tokens=8)
    assert answer["text"] == expected.text[0]
    np.testing.assert_allclose(answer["audio"], expected.waveforms[0].numpy(), atol=1e-6)
    batch = speech_to_speech([turns, turns[2:]], max_new_tokens=8)
    assert [item["text"] for item in batch] == [
        answer["text"], model.generate(conversation=turns[2:], processor=processor, max_new_tokens=8).text[0]
    ]
    with pytest.raises(ValueError, match="holds its own text"):
        speech_to_speech(turns, prompt="hi")
    with pytest.raises(ValueError, match="last message"):
        speech_to_speech(turns[:2])
