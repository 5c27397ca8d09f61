"""EchoXServer (modeling_echox/serving): concurrent requests get their lone answers; cancel, busy, bad input, close."""

import gc
import threading
import time

import numpy as np
import pytest
import torch

from modeling_echox.serving import (
    EchoXInputError,
    EchoXRequestCancelled,
    EchoXServer,
    EchoXServerBusy,
    EchoXServerClosed,
)
from modeling_echox.serving.decoding_batch import DecodingBatch
from modeling_echox.testing.random_checkpoint import build_random_echox

SR = 16000
TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_random_echox("tiny", seed=1)
    rng = np.random.default_rng(0)
    clips = [(0.05 * rng.standard_normal(int(SR * seconds))).astype(np.float32) for seconds in (1.0, 2.0, 3.0, 1.5)]
    return model, processor, clips


def _lone(model, processor, clip, **kwargs):
    """`generate`'s answer to one clip (an array at 16 kHz, or a file) alone: (tokens, text, units per segment, waveform)."""
    inputs = processor(audio=clip, sampling_rate=None if isinstance(clip, str) else SR)
    output = model.generate(**inputs, processor=processor, **kwargs)
    eos = model.generation_config.eos_token_id
    tokens = output.sequences[0].tolist()
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return tokens, output.text[0], output.segment_unit_ids[0], output.waveforms[0].numpy()


def _assert_lone_answer(request, lone):
    chunks = list(request)
    answer = request.result(timeout=TIMEOUT)
    tokens, text, units, waveform = lone
    assert answer.token_ids == tokens
    assert answer.text == text
    assert answer.segment_unit_ids == units
    assert answer.audio.shape == waveform.shape
    np.testing.assert_allclose(answer.audio, waveform, atol=1e-6)
    assert [chunk.segment for chunk in chunks] == list(range(len(chunks)))
    assert chunks[-1].is_last and not any(chunk.is_last for chunk in chunks[:-1])
    np.testing.assert_array_equal(np.concatenate([chunk.audio for chunk in chunks]), answer.audio)


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of answers in each decoding step the server runs."""
    sizes = []
    step = DecodingBatch.step

    def recording(self):
        sizes.append(len(self))
        return step(self)

    monkeypatch.setattr(DecodingBatch, "step", recording)
    return sizes


def test_padded_batch_cache_keeps_each_rows_keys_and_drops_unneeded_padding():
    from transformers import DynamicCache

    from modeling_echox.serving.batch_cache import PaddedBatchCache

    generator = torch.Generator().manual_seed(0)
    rows = {}
    for name, length in (("a", 5), ("b", 9), ("c", 3)):
        layers = [(torch.randn(1, 2, length, 4, generator=generator), torch.randn(1, 2, length, 4, generator=generator))
                  for _ in range(2)]
        mask = torch.ones(1, length, dtype=torch.long)
        mask[0, 1] = 0  # a masked prompt position stays masked
        rows[name] = (layers, mask)
    batch = PaddedBatchCache()
    for name in "abc":
        layers, mask = rows[name]
        batch.add(DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers]), mask)

    def check(names):
        width = batch.mask.shape[1]
        assert width == max(rows[name][1].shape[1] for name in names)  # no column that every row pads
        for index, name in enumerate(names):
            layers, mask = rows[name]
            length = mask.shape[1]
            assert batch.mask[index, : width - length].eq(0).all() and batch.mask[index, width - length :].equal(mask[0])
            for layer, (keys, values) in zip(batch.cache.layers, layers):
                assert layer.keys[index, :, width - length :].equal(keys[0])
                assert layer.values[index, :, width - length :].equal(values[0])

    check("abc")
    batch.remove([1])  # the longest row leaves: the padding only it needed goes
    check("ac")
    assert batch.next_mask().shape == (2, 6) and batch.mask[:, -1].eq(1).all()
    batch.remove([0, 1])
    assert len(batch) == 0 and batch.cache is None


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_concurrent_requests_get_their_lone_answers_also_when_joining_midway(tiny, batch_sizes, mode):
    model, processor, clips = tiny
    lengths = [24, 9, 17, 5]  # answers of different lengths leave the batch at different steps
    lone = [
        _lone(model, processor, clip, segmentation_mode=mode, max_new_tokens=n) for clip, n in zip(clips, lengths)
    ]
    with EchoXServer(model, processor) as server:
        first = server.submit(clips[0], sampling_rate=SR, segmentation_mode=mode, max_new_tokens=lengths[0])
        while not batch_sizes:  # the first request is being decoded: the next ones join it mid-way
            time.sleep(0.001)
        later = [
            server.submit(clip, sampling_rate=SR, segmentation_mode=mode, max_new_tokens=n)
            for clip, n in zip(clips[1:], lengths[1:])
        ]
        for request, answer in zip([first, *later], lone):
            _assert_lone_answer(request, answer)
    assert batch_sizes[0] == 1 and max(batch_sizes) >= 3  # one row at first, then the others joined it
    assert batch_sizes[-1] == 1  # the longest answer finished alone, the others having left


def test_a_conversation_is_answered_as_generate_answers_it(tiny):
    model, processor, clips = tiny
    conversation = [
        {"role": "user", "content": [{"type": "audio", "array": clips[0], "sampling_rate": SR}]},
        {"role": "assistant", "content": "monday"},
        {"role": "user", "content": [{"type": "audio", "array": clips[1], "sampling_rate": SR}]},
    ]
    output = model.generate(conversation=conversation, processor=processor, max_new_tokens=12)
    with EchoXServer(model, processor) as server:
        lone = server.submit(clips[1], sampling_rate=SR, max_new_tokens=12)
        request = server.submit(conversation=conversation, max_new_tokens=12)
        answer = request.result(timeout=TIMEOUT)
        lone.result(timeout=TIMEOUT)
        with pytest.raises(ValueError, match="not both"):
            server.submit(clips[0], sampling_rate=SR, conversation=conversation)
        bad = server.submit(conversation=conversation[:2])
        with pytest.raises(EchoXInputError, match="last message"):
            bad.result(timeout=TIMEOUT)
    assert answer.text == output.text[0] and answer.segment_unit_ids == output.segment_unit_ids[0]
    np.testing.assert_allclose(answer.audio, output.waveforms[0].numpy(), atol=1e-6)


def test_a_cancelled_request_does_not_disturb_the_others(tiny, batch_sizes):
    model, processor, clips = tiny
    lone = [_lone(model, processor, clip, segmentation_mode="fast") for clip in clips[:3]]
    with EchoXServer(model, processor) as server:
        requests = [server.submit(clip, sampling_rate=SR, segmentation_mode="fast") for clip in clips[:3]]
        assert requests[1].get(timeout=TIMEOUT) is not None  # its first segment arrived
        requests[1].cancel()
        _assert_lone_answer(requests[0], lone[0])
        _assert_lone_answer(requests[2], lone[2])
        with pytest.raises(EchoXRequestCancelled):
            requests[1].result(timeout=TIMEOUT)
        assert requests[1].done
    assert max(batch_sizes) == 3 and batch_sizes[-1] == 2  # the other two went on together to the end


def test_a_request_whose_client_went_away_leaves_the_batch(tiny, batch_sizes):
    model, processor, clips = tiny
    lone = _lone(model, processor, clips[0], segmentation_mode="fast")
    with EchoXServer(model, processor) as server:
        kept = server.submit(clips[0], sampling_rate=SR, segmentation_mode="fast")
        dropped = server.submit(clips[1], sampling_rate=SR, segmentation_mode="fast")
        dropped.get(timeout=TIMEOUT)
        del dropped  # the client went away without cancelling
        gc.collect()
        _assert_lone_answer(kept, lone)
    # the dropped request left before the kept one was done (both answers run to 24 tokens when written out)
    assert max(batch_sizes) == 2 and batch_sizes[-1] == 1


class GatedProcessor:
    """The processor, whose calls wait until `gate` is set (the server's thread is held at its first request)."""

    def __init__(self, processor):
        self.processor = processor
        self.gate = threading.Event()

    def __call__(self, *args, **kwargs):
        assert self.gate.wait(TIMEOUT)
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def test_past_the_queue_limit_submit_says_busy(tiny):
    model, processor, clips = tiny
    gated = GatedProcessor(processor)
    with EchoXServer(model, gated, max_batch_size=1, max_queue_size=1) as server:
        answering = server.submit(clips[0], sampling_rate=SR, max_new_tokens=4)
        waiting = server.submit(clips[1], sampling_rate=SR, max_new_tokens=4)
        with pytest.raises(EchoXServerBusy, match="busy.*1 answered together, 1 waiting"):
            server.submit(clips[2], sampling_rate=SR, max_new_tokens=4)
        gated.gate.set()
        assert answering.result(timeout=TIMEOUT).token_ids and waiting.result(timeout=TIMEOUT).token_ids
        assert server.submit(clips[2], sampling_rate=SR, max_new_tokens=4).result(timeout=TIMEOUT).token_ids


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.full(SR, np.nan, dtype=np.float32), "NaN"),
        (np.ones(SR * 31, dtype=np.float32) * 0.1, "30"),
        ("/no/such/question.wav", "question.wav"),
    ],
    ids=["empty", "nan", "too-long", "missing-file"],
)
def test_bad_input_fails_only_its_own_request(tiny, bad, message):
    model, processor, clips = tiny
    lone = [_lone(model, processor, clip, max_new_tokens=8) for clip in clips[:2]]
    with EchoXServer(model, processor) as server:
        good = server.submit(clips[0], sampling_rate=SR, max_new_tokens=8)
        broken = server.submit(bad, sampling_rate=SR, max_new_tokens=8)
        other = server.submit(clips[1], sampling_rate=SR, max_new_tokens=8)
        with pytest.raises(EchoXInputError, match=message):
            list(broken)
        with pytest.raises(EchoXInputError):
            broken.result(timeout=TIMEOUT)
        _assert_lone_answer(good, lone[0])
        _assert_lone_answer(other, lone[1])


def test_settings_it_cannot_serve_are_refused_at_once(tiny):
    model, processor, clips = tiny
    with EchoXServer(model, processor) as server:
        with pytest.raises(ValueError, match="beam search"):
            server.submit(clips[0], sampling_rate=SR, num_beams=2)
        with pytest.raises(ValueError, match="Unknown segmentation mode"):
            server.submit(clips[0], sampling_rate=SR, segmentation_mode="slow")
        with pytest.raises(ValueError, match="no_such_setting"):
            server.submit(clips[0], sampling_rate=SR, no_such_setting=3)
        with pytest.raises(ValueError, match="needs the audio"):
            server.submit(None)
    with pytest.raises(ValueError, match="max_batch_size"):
        EchoXServer(model, processor, max_batch_size=0)


def test_a_failed_step_ends_the_batch_it_hit_and_the_server_goes_on(tiny, monkeypatch):
    model, processor, clips = tiny
    step = DecodingBatch.step
    failures = []

    def failing_once(self):
        if not failures:
            failures.append(len(self))
            raise RuntimeError("kaboom inside a decoding step")
        return step(self)

    monkeypatch.setattr(DecodingBatch, "step", failing_once)
    lone = _lone(model, processor, clips[2], max_new_tokens=6)
    with EchoXServer(model, processor) as server:
        hit = server.submit(clips[0], sampling_rate=SR, max_new_tokens=6)
        with pytest.raises(RuntimeError, match="kaboom"):
            hit.result(timeout=TIMEOUT)
        _assert_lone_answer(server.submit(clips[2], sampling_rate=SR, max_new_tokens=6), lone)


def test_close_ends_unanswered_requests(tiny):
    model, processor, clips = tiny
    gated = GatedProcessor(processor)
    server = EchoXServer(model, gated)
    requests = [server.submit(clip, sampling_rate=SR) for clip in clips[:2]]
    closer = threading.Thread(target=server.close)
    closer.start()
    gated.gate.set()
    closer.join(TIMEOUT)
    assert server.closed
    for request in requests:
        with pytest.raises(EchoXServerClosed):
            request.result(timeout=TIMEOUT)
    with pytest.raises(EchoXServerClosed):
        server.submit(clips[0], sampling_rate=SR)


def test_sampling_is_served(tiny):
    model, processor, clips = tiny
    torch.manual_seed(0)
    with EchoXServer(model, processor) as server:
        answer = server.submit(clips[0], sampling_rate=SR, do_sample=True, top_k=5, max_new_tokens=6).result(TIMEOUT)
    assert len(answer.token_ids) <= 6 and answer.audio.dtype == np.float32


def test_echox_mini_answers_eight_spoken_questions_together_as_alone(tmp_path):
    """EchoX-mini: eight flite questions asked at once get the text, units and audio `generate` gives each alone."""
    import shutil
    import subprocess

    pytest.importorskip("ctranslate2", reason="EchoX-mini's base weights (the mini extra) are not installed")
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    from modeling_echox.mini.assembly import ensure_mini
    from modeling_echox.model.loading import load_echox

    model, processor = load_echox(ensure_mini())
    questions = ["what is the capital of france", "what day comes after monday", "what is two plus three",
                 "what month comes after march", "what is the capital of japan", "which continent is brazil in",
                 "what is six times two", "what is the capital of spain"]
    paths = []
    for index, question in enumerate(questions):
        paths.append(str(tmp_path / f"q{index}.wav"))
        subprocess.run(["flite", "-voice", "awb", "-t", question, "-o", paths[-1]], check=True)
    lone = [_lone(model, processor, path, segmentation_mode="fast") for path in paths]
    with EchoXServer(model, processor) as server:
        requests = [server.submit(path, segmentation_mode="fast") for path in paths]
        for request, answer in zip(requests, lone):
            _assert_lone_answer(request, answer)
    assert "paris" in lone[0][1]
