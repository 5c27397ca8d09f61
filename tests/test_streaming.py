"""Streaming speech out: segmentation rules, the click-free vocoder stream, and the EchoXAudioStreamer."""

from threading import Thread, current_thread

import numpy as np
import pytest
import torch
from transformers import TextIteratorStreamer

from modeling_echox import EchoXVocoderConfig
from modeling_echox.model.segmentation import FastSegmentation
from modeling_echox.model.streaming import EchoXAudioStreamer
from modeling_echox.model.vocoder import EchoXCodeHifiGan
from modeling_echox.model.vocoder_streaming import EchoXVocoderStream
from modeling_echox.testing.random_checkpoint import build_random_echox

SR = 16000


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_random_echox("tiny", seed=1)
    rng = np.random.default_rng(0)
    inputs = processor(audio=(0.05 * rng.standard_normal(SR * 2)).astype(np.float32), sampling_rate=SR)
    return model, processor, inputs


@pytest.fixture(scope="module")
def loud_vocoder():
    """A random vocoder whose convolutions are scaled up so that it makes a non-trivial waveform."""
    torch.manual_seed(0)
    vocoder = EchoXCodeHifiGan(EchoXVocoderConfig(num_units=50, unit_embed_dim=16, upsample_initial_channel=32)).eval()
    with torch.no_grad():
        for name, parameter in vocoder.hifi_gan.named_parameters():
            if name.endswith("weight"):
                parameter.mul_(16.0)
    return vocoder


def test_fast_rule_cuts_at_word_boundaries():
    rule = FastSegmentation(first_tokens=3, min_tokens=4, max_tokens=8)
    texts = ["The", " capital", " of", " kenya", " is", " nair", "obi", ",", " a", " city", " in", " east", " africa", "."]
    spans = rule.split([0.0] * len(texts), texts)
    assert spans[0] == (0, 3)  # "The capital of": cut once " kenya" shows a word boundary
    assert spans[1] == (3, 8)  # "kenya is nairobi," ends at the comma (the comma stays with its word)
    assert spans[-1][1] == len(texts)
    for start, end in spans[1:-1]:
        assert texts[end][:1] == " "  # never inside a word ("nair|obi")


def test_fast_rule_can_cut_the_first_tokens_at_once():
    rule = FastSegmentation(first_tokens=1, min_tokens=4, max_tokens=8, first_whole_words=False)
    texts = ["gu", "inea", " is", " in", " africa", "."]
    assert rule.cut_after([0.0], texts[:1], 0) == 0  # no waiting for the next token, even inside a word
    spans = rule.split([0.0] * len(texts), texts)
    assert spans == [(0, 1), (1, len(texts))]
    whole = FastSegmentation(first_tokens=1, min_tokens=4, max_tokens=8)
    assert whole.cut_after([0.0], texts[:1], 0) is None and whole.split([0.0] * 3, texts[:3])[0] == (0, 2)


def test_vocoder_stream_matches_one_shot_and_has_no_clicks(loud_vocoder):
    units = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(3))
    pieces = [units[:7], units[7:25], units[25:31], units[31:]]
    stream = EchoXVocoderStream(loud_vocoder)
    streamed = torch.cat([stream.push(piece) for piece in pieces] + [stream.flush()])
    durations = torch.tensor(stream.durations)
    with torch.no_grad():
        one_shot = loud_vocoder(units, durations=durations).waveform[0]
    assert streamed.shape == one_shot.shape
    assert one_shot.abs().max() > 0.05  # a real signal, not silence
    error = (streamed - one_shot).pow(2).sum() / one_shot.pow(2).sum()
    snr_db = -10 * torch.log10(error)
    naive = torch.cat([loud_vocoder(p, durations=d).waveform[0] for p, d in zip(pieces, durations.split([len(p) for p in pieces]))])
    naive_snr_db = -10 * torch.log10((naive - one_shot).pow(2).sum() / one_shot.pow(2).sum())
    # Short pieces (6 units) without right context: the tails differ from one-shot synthesis, but far less than
    # independent synthesis of each piece, which is what clicks.
    assert snr_db > 15, snr_db
    assert snr_db > naive_snr_db + 6, (snr_db, naive_snr_db)
    # no step at the joins larger than the one-shot signal's own largest step
    hop = loud_vocoder.config.hop_length
    joins = [int(durations[:n].sum()) * hop for n in (7, 25, 31)]
    largest_step = one_shot.diff().abs().max()
    for join in joins:
        assert streamed[join - 200 : join + 200].diff().abs().max() <= largest_step * 1.05


def test_vocoder_stream_rejects_bad_settings(loud_vocoder):
    with pytest.raises(ValueError, match="left_context_units"):
        EchoXVocoderStream(loud_vocoder, left_context_units=2, crossfade_frames=4)
    assert EchoXVocoderStream(loud_vocoder).push([]).numel() == 0


@pytest.mark.parametrize("vocoding", ["faithful", "crossfade"])
@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_stream_equals_generate(tiny, mode, vocoding):
    model, processor, inputs = tiny
    kwargs = dict(processor=processor, segmentation_mode=mode, vocoding_mode=vocoding, max_new_tokens=48)
    reference = model.generate(**inputs, **kwargs)
    chunks = list(model.stream(**inputs, **kwargs, timeout=120))
    assert [chunk.segment for chunk in chunks] == list(range(len(reference.segments[0])))
    assert chunks[-1].is_last and not any(chunk.is_last for chunk in chunks[:-1])
    assert [chunk.unit_ids for chunk in chunks] == reference.segment_unit_ids[0]
    assert "".join(chunk.text for chunk in chunks) == reference.text[0]
    joined = np.concatenate([chunk.audio for chunk in chunks])
    np.testing.assert_allclose(joined, reference.waveforms[0].numpy(), atol=1e-6)
    assert all(chunk.audio.dtype == np.float32 and chunk.sampling_rate == 16000 for chunk in chunks)


@pytest.mark.parametrize("now", [True, False])
def test_first_segment_voiced_in_generates_thread_pauses_the_text(tiny, now):
    model, processor, inputs = tiny
    seen = []

    class Recording(EchoXAudioStreamer):
        def _voice(self, segment):
            if segment.index == 0:  # tokens generated by the time the first segment is voiced (it is cut one token late)
                seen.append((self.voicer.num_tokens, segment.end - segment.start, current_thread() is generating[0]))
            super()._voice(segment)

    streamer = Recording(voice_first_segment_now=now)
    kwargs = {**inputs, "tokenizer": processor.tokenizer, "segmentation_mode": "fast", "streamer": streamer,
              "max_new_tokens": 48}
    generating = [Thread(target=model.generate, kwargs=kwargs)]
    generating[0].start()
    chunks = list(streamer)
    generating[0].join()
    tokens, first_segment, in_generate_thread = seen[0]
    assert in_generate_thread is now
    if now:
        assert tokens == first_segment + 1
    reference = model.generate(**inputs, tokenizer=processor.tokenizer, segmentation_mode="fast", max_new_tokens=48)
    assert [chunk.unit_ids for chunk in chunks] == reference.segment_unit_ids[0]


def test_first_tokens_voiced_without_waiting_match_generate(tiny):
    model, processor, inputs = tiny
    voiced_at = []

    class Recording(EchoXAudioStreamer):
        def _voice(self, segment):
            voiced_at.append((self.voicer.num_tokens, segment.end - segment.start))
            super()._voice(segment)

    # an EchoX generation field given to generate like any other generation parameter
    kwargs = {**inputs, "tokenizer": processor.tokenizer, "segmentation_mode": "fast", "max_new_tokens": 48,
              "fast_first_segment_whole_words": False}
    streamer = Recording()
    thread = Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer})
    thread.start()
    chunks = list(streamer)
    thread.join()
    reference = model.generate(**kwargs)
    assert model.generation_config.fast_first_segment_whole_words  # the model's own generation config is untouched
    first = model.generation_config.fast_first_segment_tokens
    assert voiced_at[0] == (first, first)  # voiced as soon as its last token is there
    assert reference.segments[0][0] == (0, first)
    assert [chunk.unit_ids for chunk in chunks] == reference.segment_unit_ids[0]
    np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), reference.waveforms[0].numpy(), atol=1e-6)


def test_faithful_vocoding_voices_each_segment_alone(tiny):
    """The released vocoding: each segment's units through the vocoder alone (own durations), waveforms concatenated."""
    model, processor, inputs = tiny
    output = model.generate(**inputs, processor=processor, segmentation_mode="fast", vocoding_mode="faithful",
                            max_new_tokens=48)
    spoken = [units for units in output.segment_unit_ids[0] if units]
    assert len(spoken) >= 2
    with torch.no_grad():
        alone = [model.vocoder(torch.tensor(units), durations=model.vocoder.predict_durations(torch.tensor(units))[0])
                 for units in spoken]
    expected = torch.cat([out.waveform[0, : out.waveform_lengths[0]] for out in alone])
    torch.testing.assert_close(output.waveforms[0], expected)
    crossfaded = model.generate(**inputs, processor=processor, segmentation_mode="fast", vocoding_mode="crossfade",
                                max_new_tokens=48)
    assert crossfaded.unit_ids == output.unit_ids and not torch.equal(crossfaded.waveforms[0], output.waveforms[0])
    with pytest.raises(ValueError, match="Unknown vocoding mode"):
        model.generate(**inputs, processor=processor, vocoding_mode="smooth")


def test_answer_ending_at_a_cut_still_streams_its_tail(tiny):
    model, processor, inputs = tiny
    # The first segment is the whole answer, cut at its last token: with cross-faded vocoding the stream's last chunk
    # holds no text, only the vocoder's held-back tail, as generate's waveform does.
    kwargs = {**inputs, "tokenizer": processor.tokenizer, "segmentation_mode": "fast", "vocoding_mode": "crossfade",
              "max_new_tokens": 12,
              "min_new_tokens": 12, "fast_first_segment_tokens": 12, "fast_first_segment_whole_words": False}
    reference = model.generate(**kwargs)
    assert reference.segments[0] == [(0, 12)] and reference.segment_unit_ids[0][0]  # a segment with units to voice
    chunks = list(model.stream(**kwargs, timeout=120))
    assert [(chunk.segment, chunk.is_last) for chunk in chunks] == [(0, False), (1, True)]
    assert chunks[1].text == "" and chunks[1].unit_ids == [] and len(chunks[1].audio) > 0
    assert [chunks[0].unit_ids] == reference.segment_unit_ids[0]
    np.testing.assert_array_equal(np.concatenate([c.audio for c in chunks]), reference.waveforms[0].numpy())


def test_fast_mode_speaks_earlier(tiny):
    model, processor, inputs = tiny
    kwargs = dict(tokenizer=processor.tokenizer, max_new_tokens=48)
    faithful = model.generate(**inputs, segmentation_mode="faithful", **kwargs)
    fast = model.generate(**inputs, segmentation_mode="fast", **kwargs)
    assert fast.segments[0][0][1] < faithful.segments[0][0][1]
    assert len(fast.segments[0]) > 1


def test_streamer_bad_use(tiny):
    model, processor, inputs = tiny
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**inputs, segmentation_mode="fast", streamer=EchoXAudioStreamer())
    batch = processor(text=["one", "two"])
    with pytest.raises(ValueError, match="one request at a time"):
        model.generate(**batch, streamer=EchoXAudioStreamer())
    with pytest.raises(ValueError, match="Unknown segmentation mode"):
        list(model.stream(**inputs, tokenizer=processor.tokenizer, segmentation_mode="slow"))
    used = EchoXAudioStreamer()
    model.generate(**inputs, tokenizer=processor.tokenizer, streamer=used, max_new_tokens=4)
    with pytest.raises(ValueError, match="new one for each request"):
        model.generate(**inputs, tokenizer=processor.tokenizer, streamer=used, max_new_tokens=4)


def test_text_streamer_still_works(tiny):
    model, processor, inputs = tiny
    streamer = TextIteratorStreamer(processor.tokenizer, skip_special_tokens=True)
    result = {}
    thread = Thread(target=lambda: result.update(out=model.generate(**inputs, tokenizer=processor.tokenizer, streamer=streamer)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == result["out"].text[0]
