"""Streaming speech out: segmentation rules, the click-free vocoder stream, and the EchoXAudioStreamer."""

from threading import Thread, current_thread

import numpy as np
import pytest
import torch
from transformers import TextIteratorStreamer

from modeling_echox import EchoXVocoderConfig
from modeling_echox.random_checkpoint import build_random_echox
from modeling_echox.segmentation import FastSegmentation
from modeling_echox.streaming import EchoXAudioStreamer
from modeling_echox.vocoder import EchoXCodeHifiGan
from modeling_echox.vocoder_streaming import EchoXVocoderStream

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
    assert rule.cut_if_next_starts_word([0.0], texts[:1], 0) is None
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


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_stream_equals_generate(tiny, mode):
    model, processor, inputs = tiny
    reference = model.generate(**inputs, tokenizer=processor.tokenizer, segmentation_mode=mode, max_new_tokens=48)
    chunks = list(model.stream(**inputs, tokenizer=processor.tokenizer, segmentation_mode=mode, max_new_tokens=48, timeout=120))
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
        def _voice(self, index, states, tokens, text, last):
            if index == 0:  # tokens generated by the time the first segment is voiced (it is cut one token late)
                seen.append((len(self._tokens), len(states), current_thread() is generating[0]))
            super()._voice(index, states, tokens, text, last)

    streamer = Recording(model, processor.tokenizer, segmentation_mode="fast", voice_first_segment_now=now)
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
        def _voice(self, index, states, tokens, text, last):
            voiced_at.append((len(self._tokens), len(states)))
            super()._voice(index, states, tokens, text, last)

    model.config.fast_first_segment_whole_words = False
    try:
        streamer = Recording(model, processor.tokenizer, segmentation_mode="fast")
        thread = Thread(target=model.generate, kwargs={**inputs, "tokenizer": processor.tokenizer, "streamer": streamer,
                                                       "segmentation_mode": "fast", "max_new_tokens": 48})
        thread.start()
        chunks = list(streamer)
        thread.join()
        reference = model.generate(**inputs, tokenizer=processor.tokenizer, segmentation_mode="fast", max_new_tokens=48)
    finally:
        model.config.fast_first_segment_whole_words = True
    first = model.config.fast_first_segment_tokens
    assert voiced_at[0] == (first, first)  # voiced as soon as its last token is there
    assert reference.segments[0][0] == (0, first)
    assert [chunk.unit_ids for chunk in chunks] == reference.segment_unit_ids[0]
    np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), reference.waveforms[0].numpy(), atol=1e-6)


def _generate_in_a_thread(model, kwargs, threads=None, consume=True):
    """Run `generate` in a new thread (that first sets `threads` torch threads); its count afterwards (and error)."""
    after = []

    def run():
        if threads:
            torch.set_num_threads(threads)
        try:
            model.generate(**kwargs)
        except RuntimeError as error:
            after.append(error)
        after.insert(0, torch.get_num_threads())

    thread = Thread(target=run)
    thread.start()
    if consume:
        list(kwargs["streamer"])
    thread.join()
    return after


def _threads_of_a_new_thread():
    seen = []
    thread = Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.parametrize("split", [True, False])
def test_decoding_and_voicing_split_the_cores(tiny, split):
    model, processor, inputs = tiny
    threads = {"put": [], "voice": []}

    class Recording(EchoXAudioStreamer):
        def put(self, value):
            threads["put"].append(torch.get_num_threads())
            super().put(value)

        def _voice(self, index, states, tokens, text, last):
            threads["voice"].append((last, torch.get_num_threads()))
            super()._voice(index, states, tokens, text, last)

    torch.set_num_threads(2)  # the streamer's maker has 2 threads, generate's thread starts with 1
    try:
        streamer = Recording(model, processor.tokenizer, segmentation_mode="fast", voice_first_segment_now=False,
                             split_cores=split)
        after = _generate_in_a_thread(model, {**inputs, "tokenizer": processor.tokenizer, "segmentation_mode": "fast",
                                              "streamer": streamer, "max_new_tokens": 24, "min_new_tokens": 24}, 1)
        assert after == [1]  # generate's thread gets its own count back
    finally:
        torch.set_num_threads(2)
    if split:
        # put 0 is the prompt, put 1 the first token: prefilled on the maker's 2 threads; later tokens decoded on one
        assert threads["put"][:2] == [2, 2] and set(threads["put"][2:]) == {1}
        assert len(threads["voice"]) > 1 and {count for last, count in threads["voice"] if not last} == {1}
    else:
        assert set(threads["put"]) == {1}


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_split_cores_leaves_the_thread_count_of_new_threads(tiny, mode):
    model, processor, inputs = tiny
    torch.set_num_threads(2)
    streamer = EchoXAudioStreamer(model, processor.tokenizer, segmentation_mode=mode, voice_first_segment_now=False,
                                  split_cores=True)
    after = _generate_in_a_thread(model, {**inputs, "tokenizer": processor.tokenizer, "segmentation_mode": mode,
                                          "streamer": streamer, "max_new_tokens": 24, "min_new_tokens": 24})
    assert after == [2]
    assert _threads_of_a_new_thread() == 2  # the voicing threads' one thread is not what new threads start with


def test_split_cores_gives_the_threads_back_when_generate_fails(tiny):
    model, processor, inputs = tiny

    class Failing(EchoXAudioStreamer):
        def put(self, value):
            super().put(value)
            if len(self._tokens) == 3:
                raise RuntimeError("stop here")

    streamer = Failing(model, processor.tokenizer, segmentation_mode="fast", split_cores=True)
    after = _generate_in_a_thread(model, {**inputs, "tokenizer": processor.tokenizer, "streamer": streamer,
                                          "segmentation_mode": "fast", "max_new_tokens": 24, "min_new_tokens": 24},
                                  3, consume=False)
    assert after[0] == 3 and str(after[1]) == "stop here"


def _drive(streamer, tokens, states):
    """Feed `streamer` the way `generate` does (prompt, then a hidden state and a token per step) and collect it."""
    streamer.put(torch.tensor([[1, 2]]))
    for token, state in zip(tokens, states):
        streamer.put_hidden_state(state[None])
        streamer.put(torch.tensor([token]))
    streamer.end()
    return list(streamer)


@pytest.mark.parametrize(
    "words, guessed_right",
    [
        ([" the", " capital", " comes", " the", " day"], True),  # the 4th token starts a word: the first guess holds
        ([" the", " capital", " cap", "day", " the"], False),  # "cap|day" continues a word: the guess is dropped
    ],
)
def test_fast_mode_voices_the_first_segment_ahead(tiny, words, guessed_right):
    model, processor, _ = tiny
    tokenizer = processor.tokenizer
    tokens = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))[0] for word in words]
    assert [tokenizer.decode([token]) for token in tokens] == words
    states = torch.randn(len(tokens), model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    guesses = []

    class Recording(EchoXAudioStreamer):
        def _voice_alone(self, states, tokens):
            guesses.append(len(states))
            return super()._voice_alone(states, tokens)

    ahead = Recording(model, tokenizer, segmentation_mode="fast", speculate_first_segment=True)
    chunks = _drive(ahead, tokens, states)
    plain = _drive(EchoXAudioStreamer(model, tokenizer, segmentation_mode="fast", speculate_first_segment=False),
                   tokens, states)
    first = model.config.fast_first_segment_tokens  # 3 in the tiny config
    if guessed_right:
        assert guesses == [first]
    else:  # the first guess may have been cancelled before it started; the second one is voiced
        assert guesses[-1] == first + 1 and set(guesses) <= {first, first + 1}
    assert ahead.first_segment_speculated
    assert [chunk.text for chunk in chunks] == [chunk.text for chunk in plain]
    assert chunks[0].text == "".join(words[: first if guessed_right else first + 1])
    assert [chunk.unit_ids for chunk in chunks] == [chunk.unit_ids for chunk in plain]
    np.testing.assert_array_equal(np.concatenate([c.audio for c in chunks]), np.concatenate([c.audio for c in plain]))


def test_faithful_mode_does_not_guess(tiny):
    model, processor, inputs = tiny
    streamer = EchoXAudioStreamer(model, processor.tokenizer, segmentation_mode="faithful", speculate_first_segment=True)
    thread = Thread(target=model.generate, kwargs={**inputs, "tokenizer": processor.tokenizer, "streamer": streamer,
                                                   "segmentation_mode": "faithful", "max_new_tokens": 48})
    thread.start()
    list(streamer)
    thread.join()
    assert streamer._speculation is None and not streamer.first_segment_speculated


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
        EchoXAudioStreamer(model, None, segmentation_mode="fast")
    batch = processor(text=["one", "two"])
    with pytest.raises(ValueError, match="one request at a time"):
        model.generate(**batch, streamer=EchoXAudioStreamer(model, processor.tokenizer))
    with pytest.raises(ValueError, match="Unknown segmentation mode"):
        list(model.stream(**inputs, tokenizer=processor.tokenizer, segmentation_mode="slow"))


def test_text_streamer_still_works(tiny):
    model, processor, inputs = tiny
    streamer = TextIteratorStreamer(processor.tokenizer, skip_special_tokens=True)
    result = {}
    thread = Thread(target=lambda: result.update(out=model.generate(**inputs, tokenizer=processor.tokenizer, streamer=streamer)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == result["out"].text[0]
