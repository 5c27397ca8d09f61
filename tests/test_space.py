"""
The Gradio Space (modeling_echox/demo.py): its streaming answer function without a server, its API through
gradio_client, and the page in a real browser (Debian's chromium driven by Playwright), on a tiny random checkpoint.
"""

import io
import os
import shutil
import subprocess
import threading
import time
import wave

import numpy as np
import pytest
import soundfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio", reason="the demo extra (gradio==6.31.0) is not installed")

from modeling_echox.demo import (  # noqa: E402
    EXAMPLE_QUESTIONS,
    EchoXSpace,
    build_demo,
    launch_kwargs,
    synthesize_examples,
    wav_bytes,
)
from modeling_echox.testing.space_process import free_port  # noqa: E402

SR = 16000
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",  # a fake microphone (it beeps), for the recording test
    "--use-fake-ui-for-media-stream",
]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from modeling_echox.testing.random_checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("space") / "echox-tiny"
    write_random_checkpoint(str(path))
    return str(path)


@pytest.fixture(scope="module")
def space(checkpoint):
    return EchoXSpace.from_pretrained(checkpoint)


def _needs_ffmpeg():
    if shutil.which("ffmpeg") is None:
        pytest.skip("gradio's streamed audio output needs the ffmpeg binary (apt-get install ffmpeg)")


@pytest.fixture(scope="module")
def served(checkpoint, space, tmp_path_factory):
    """The app on a free loopback port, shared by the API and browser tests."""
    _needs_ffmpeg()
    demo = build_demo(checkpoint, space=space, examples_dir=str(tmp_path_factory.mktemp("examples")))
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        **launch_kwargs(demo),
    )
    yield demo
    demo.close()


def _wav_info(data: bytes) -> tuple[int, int, int, int]:
    with wave.open(io.BytesIO(data), "rb") as reader:
        return reader.getframerate(), reader.getnchannels(), reader.getsampwidth(), reader.getnframes()


def _wav_pcm(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data), "rb") as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")


def _generated(space, wav_path, mode) -> tuple[str, np.ndarray]:
    """The model's non-streamed answer to the question in `wav_path`: its text, and its waveform as 16-bit PCM."""
    samples, rate = soundfile.read(wav_path, dtype="float32")
    inputs = space.processor(audio=samples, sampling_rate=rate)
    output = space.model.generate(**inputs, tokenizer=space.processor.tokenizer, segmentation_mode=mode)
    waveform = np.clip(output.waveforms[0].numpy(), -1.0, 1.0)
    return output.text[0], np.round(waveform * 32767.0).astype(np.int16)


def _same_pcm(got: np.ndarray, expected: np.ndarray) -> bool:
    """Equal sample counts, and equal samples within one 16-bit step (rounding)."""
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    return got.shape == expected.shape and (got.size == 0 or int(diff.max()) <= 1)


# ---------------------------------------------------------------------------------------- no server: the generator
def test_wav_bytes_is_16bit_pcm_and_clips():
    data = wav_bytes(np.array([0.0, 0.5, -1.5, 2.0, np.nan], dtype=np.float32))
    assert _wav_info(data) == (SR, 1, 2, 5)
    with wave.open(io.BytesIO(data), "rb") as reader:
        pcm = np.frombuffer(reader.readframes(5), dtype="<i2")
    assert pcm.tolist() == [0, 16384, -32767, 32767, 0]


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_respond_streams_growing_text_and_audio(space, question_wav, mode):
    outputs = list(space.respond(question_wav, mode))
    assert outputs, "no output at all"
    texts = [text for text, _, _, _ in outputs]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)  # the answer only grows
    assert texts[-1].strip()
    chunks = [audio for _, audio, _, _ in outputs if audio is not None]
    assert chunks, "no audio chunk"
    frames = 0
    for chunk in chunks:
        rate, channels, width, count = _wav_info(chunk)
        assert (rate, channels, width) == (SR, 1, 2)
        assert count > 0
        frames += count
    assert frames > 0
    assert outputs[-1][2].startswith("done")
    assert f"`{mode}`" in outputs[-1][2]
    assert not any(status.startswith("done") for _, _, status, _ in outputs[:-1])
    if mode == "fast":  # the tiny model's fast rule cuts its answer into more than one segment
        assert len(outputs) >= 2 and texts[0] != texts[-1]

    # The last output: no new streamed audio, the whole answer as one wav (only there), equal to the streamed chunks
    # joined and to the model's non-streamed answer.
    assert outputs[-1][1] is None and all(whole is None for _, _, _, whole in outputs[:-1])
    whole = outputs[-1][3]
    assert _wav_info(whole)[:3] == (SR, 1, 2)
    assert np.array_equal(_wav_pcm(whole), np.concatenate([_wav_pcm(chunk) for chunk in chunks]))
    text, pcm = _generated(space, question_wav, mode)
    assert texts[-1] == text
    assert _same_pcm(_wav_pcm(whole), pcm)


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + os.urandom(200))
    empty_file = tmp_path / "empty.wav"
    empty_file.write_bytes(b"")
    nan_file = tmp_path / "nan.wav"
    samples = np.full(SR, 0.1, dtype=np.float32)
    samples[100] = np.nan
    soundfile.write(nan_file, samples, SR, subtype="FLOAT")
    return {
        "nothing": (None, "No question yet"),
        "empty array": ((SR, np.zeros(0, dtype=np.int16)), "empty"),
        "empty file": (str(empty_file), "empty"),
        "silent": ((SR, np.zeros(SR, dtype=np.int16)), "silent"),
        "too long": ((SR, (1000 * np.ones(31 * SR)).astype(np.int16)), "too long"),
        "nan": (str(nan_file), "invalid samples"),
        "corrupt": (str(corrupt), "Could not read this audio file"),
        "missing": (str(tmp_path / "nope.wav"), "did not arrive"),
    }


def test_bad_input_gives_a_friendly_error_then_a_good_input_works(space, question_wav, tmp_path):
    for name, (audio, expected) in _bad_inputs(tmp_path).items():
        with pytest.raises(gr.Error) as caught:
            list(space.respond(audio, "fast"))
        message = caught.value.message
        assert expected in message, f"{name}: {message!r}"
        assert "Traceback" not in message and "File \"" not in message
    assert "30 seconds" in str(_raise(space, (SR, (1000 * np.ones(31 * SR)).astype(np.int16))))
    outputs = list(space.respond(question_wav, "fast"))  # the space still answers after all that
    assert outputs[-1][0].strip() and any(audio is not None for _, audio, _, _ in outputs)


def _raise(space, audio):
    with pytest.raises(gr.Error) as caught:
        list(space.respond(audio, "fast"))
    return caught.value.message


def test_gradio_numpy_input_and_unknown_mode(space, question_wav):
    samples, rate = soundfile.read(question_wav, dtype="int16")  # what gr.Audio(type="numpy") would pass
    outputs = list(space.respond((rate, samples), "no-such-mode"))
    assert outputs[-1][0].strip()
    assert f"`{space.default_mode}`" in outputs[-1][2]


def test_model_failure_is_reported_without_a_traceback(space, question_wav, monkeypatch):
    from modeling_echox.serving.decoding_batch import DecodingBatch

    def broken(*args, **kwargs):
        raise RuntimeError("kaboom inside the model")

    monkeypatch.setattr(DecodingBatch, "add", broken)
    message = _raise(space, question_wav)
    assert "something went wrong" in message and "kaboom" not in message


class ScriptedRequest:
    """Stands in for an `EchoXRequest`: hands out `(delay_s, chunk)` pairs, each chunk `delay_s` after the one before."""

    def __init__(self, script):
        self._script = list(script)
        self._due = time.perf_counter() + (self._script[0][0] if self._script else 0.0)
        self.cancelled = False

    def get(self, timeout=None):
        if not self._script:
            return None
        wait = self._due - time.perf_counter()
        if timeout is not None and wait > timeout:
            time.sleep(timeout)
            raise TimeoutError
        time.sleep(max(0.0, wait))
        _, chunk = self._script.pop(0)
        if self._script:
            self._due = time.perf_counter() + self._script[0][0]
        return chunk

    def cancel(self):
        self.cancelled = True


def test_slow_segments_are_followed_by_one_sample_nudges(space, question_wav, monkeypatch):
    """While the next segment is being made, the generator yields 1-sample repeats of the last sample (see modeling_echox/demo.py)."""
    from modeling_echox.model.streaming import EchoXStreamChunk

    first = np.linspace(0.0, 0.5, 800, dtype=np.float32)
    script = [
        (0.0, EchoXStreamChunk("Hello ", first, [], 0, False, SR)),
        (0.8, EchoXStreamChunk("world.", np.full(800, 0.5, np.float32), [], 1, True, SR)),
    ]
    monkeypatch.setattr(space.server, "submit", lambda *args, **kwargs: ScriptedRequest(script))
    outputs = list(space.respond(question_wav, "fast"))
    sizes = [_wav_info(audio)[3] for _, audio, _, _ in outputs if audio is not None]
    assert sizes[0] == 800 and sizes[-1] == 800
    nudges = [audio for _, audio, _, _ in outputs[1:-2] if audio is not None]
    assert 1 <= len(nudges) <= 8 and all(_wav_info(n)[3] == 1 for n in nudges)
    assert all(text == "Hello " for text, _, _, _ in outputs[1:-2])
    assert outputs[-1][0] == "Hello world."
    # the whole answer holds the two segments, not the nudges
    expected = np.round(np.concatenate([first, np.full(800, 0.5, np.float32)]) * 32767.0).astype(np.int16)
    assert np.array_equal(_wav_pcm(outputs[-1][3]), expected)


def test_listeners_are_answered_together_by_the_server(space, question_wav, tmp_path, monkeypatch):
    """Questions asked at the same time share the server's decoding steps, and each gets its lone answer."""
    from modeling_echox.serving.decoding_batch import DecodingBatch

    sizes, step = [], DecodingBatch.step

    def recording(self):
        sizes.append(len(self))
        return step(self)

    monkeypatch.setattr(DecodingBatch, "step", recording)
    samples, rate = soundfile.read(question_wav, dtype="float32")
    louder = tmp_path / "louder.wav"
    soundfile.write(louder, 0.5 * samples, rate)
    questions = [question_wav, str(louder), question_wav]
    results = [None] * len(questions)

    def listen(index):
        results[index] = list(space.respond(questions[index], "fast"))

    listeners = [threading.Thread(target=listen, args=(index,)) for index in range(len(questions))]
    for listener in listeners:
        listener.start()
    for listener in listeners:
        listener.join(120)
    assert max(sizes) >= 2  # answered in one batch
    for question, outputs in zip(questions, results):
        text, pcm = _generated(space, question, "fast")
        assert outputs[-1][0] == text and _same_pcm(_wav_pcm(outputs[-1][3]), pcm)


def test_a_busy_server_gives_a_friendly_error(space, question_wav, monkeypatch):
    from modeling_echox.serving import EchoXServerBusy

    def busy(*args, **kwargs):
        raise EchoXServerBusy("EchoX is busy")

    monkeypatch.setattr(space.server, "submit", busy)
    assert "as many questions as it can" in _raise(space, question_wav)


def test_examples_are_synthesized_and_cached(tmp_path, monkeypatch):
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    paths = synthesize_examples(tmp_path)
    assert len(paths) == len(EXAMPLE_QUESTIONS)
    for path in paths:
        info = soundfile.info(path)
        assert info.duration > 0.5
    before = [os.path.getmtime(p) for p in paths]
    time.sleep(0.01)
    assert synthesize_examples(tmp_path) == paths  # reused, not re-made
    assert [os.path.getmtime(p) for p in paths] == before


def test_without_flite_the_demo_offers_no_examples(checkpoint, space, tmp_path, monkeypatch):
    import modeling_echox.demo as app

    monkeypatch.setattr(app.shutil, "which", lambda name: None)
    assert synthesize_examples(tmp_path) == []
    demo = build_demo(checkpoint, space=space, examples_dir=str(tmp_path))
    assert demo.echox_examples == []
    assert not any(isinstance(block, gr.Dataset) for block in demo.blocks.values())


def test_demo_layout_and_queue(checkpoint, space, tmp_path):
    from modeling_echox.demo import CONCURRENT_ANSWERS, QUEUE_MAX_SIZE

    demo = build_demo(checkpoint, space=space, examples_dir=str(tmp_path))
    fns = [fn for fn in demo.fns.values() if fn.api_name == "respond"]
    # several listeners at once, all answered by the one server (which batches them); the rest wait in gradio's queue
    assert len(fns) == 1 and fns[0].concurrency_limit == CONCURRENT_ANSWERS == space.server.max_batch_size > 1
    assert demo._queue.max_size == QUEUE_MAX_SIZE
    audios = {block.elem_id: block for block in demo.blocks.values() if isinstance(block, gr.Audio)}
    question, answer, whole = audios["question"], audios["answer-audio"], audios["answer-wav"]
    assert question.sources == ["microphone", "upload"] and not question.streaming
    assert answer.autoplay and answer.streaming
    assert not whole.streaming and whole.format == "wav" and not whole.interactive
    outputs = fns[0].outputs
    assert [block.elem_id for block in outputs[:4]] == ["answer-text", "answer-audio", "status", "answer-wav"]
    assert isinstance(outputs[4], gr.State) and fns[0].inputs[2] is outputs[4]  # the listener's conversation
    shown = next(fn for fn in demo.fns.values() if [block.elem_id for block in fn.outputs] == ["conversation"])
    assert shown.inputs == [outputs[4]]
    reset = next(fn for fn in demo.fns.values() if fn.api_name == "new_conversation")
    assert reset.outputs[0] is outputs[4]
    radio = next(block for block in demo.blocks.values() if isinstance(block, gr.Radio))
    assert [choice[1] for choice in radio.choices] == ["faithful", "fast"]


def test_each_request_gives_its_freed_memory_back(space, question_wav, monkeypatch):
    """`release_freed_memory` runs once per request however it ends: answered, refused, or left by the listener."""
    import modeling_echox.demo as app

    calls = []
    monkeypatch.setattr(app, "release_freed_memory", lambda: calls.append(1))
    list(space.respond(question_wav, "fast"))
    assert len(calls) == 1
    with pytest.raises(gr.Error):
        list(space.respond(None, "fast"))
    assert len(calls) == 2
    answer = space.respond(question_wav, "fast")
    next(answer)
    assert len(calls) == 2
    answer.close()  # the listener left after the first segment
    assert len(calls) == 3


def test_freed_memory_goes_back_with_glibc():
    import platform

    import modeling_echox.memory as memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert memory._MALLOC_TRIM is not None
    memory.release_freed_memory()


def test_default_model_is_the_argument_else_env_else_ensure_mini(monkeypatch, tmp_path):
    import modeling_echox.demo as app
    import modeling_echox.mini.assembly as echox_mini
    from modeling_echox.mini.assembly import default_model_dir

    monkeypatch.setattr(echox_mini, "ensure_mini", lambda: str(tmp_path / "mini"))
    monkeypatch.delenv("ECHOX_MODEL", raising=False)
    assert default_model_dir(None) == str(tmp_path / "mini")
    assert default_model_dir("given/dir") == "given/dir"
    monkeypatch.setenv("ECHOX_MODEL", "env/dir")
    assert default_model_dir(None) == "env/dir"
    assert default_model_dir("given/dir") == "given/dir"
    assert app.build_parser().parse_args([]).model is None  # resolved at start-up, not when the parser is built


def test_cli_has_demo_command():
    from modeling_echox.cli import build_parser

    args = build_parser().parse_args(["demo", "--model", "some/dir", "--port", "7999"])
    assert (args.command, args.model, args.port) == ("demo", "some/dir", 7999)
    assert callable(args.run)


# --------------------------------------------------------------------------------------------- API: gradio_client
def test_api_streams_text_and_audio(served, question_wav):
    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served.local_url, verbose=False, analytics_enabled=False)
    job = client.submit(handle_file(question_wav), "fast", api_name="/respond")
    outputs = list(job)
    assert outputs, "the endpoint yielded nothing"
    text, audio, status, whole = job.outputs()[-1]
    assert text.strip() and status.startswith("done")
    assert str(audio).endswith(".m3u8")  # streamed audio is an HLS playlist of AAC segments

    # The whole answer as a wav file the client can play: the model's non-streamed answer, to 16-bit rounding.
    assert str(whole).endswith(".wav") and os.path.isfile(whole)
    pcm, rate = soundfile.read(whole, dtype="int16")
    expected_text, expected_pcm = _generated(served.echox_space, question_wav, "fast")
    assert rate == SR and text == expected_text
    assert pcm.size > 0 and _same_pcm(pcm, expected_pcm)

    # The stream on the server: AAC segments that decode to audio.
    runs = served.pending_streams[client.session_hash]
    streams = [stream for run in runs.values() for stream in run.values()]
    assert streams and all(stream.ended for stream in streams)
    segments = [segment for stream in streams for segment in stream.segments]
    assert segments and sum(segment["duration"] for segment in segments) > 0
    run_id, run = next(iter(runs.items()))
    component_id = next(iter(run))
    base = f"{served.local_url}gradio_api/stream/{client.session_hash}/{run_id}/{component_id}"
    playlist = httpx.get(f"{base}/playlist.m3u8").text
    assert playlist.startswith("#EXTM3U") and "#EXT-X-ENDLIST" in playlist and ".aac" in playlist
    first = next(line for line in playlist.splitlines() if ".aac" in line)
    aac = httpx.get(f"{base}/{first}").content
    pcm = subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "aac", "-i", "pipe:0", "-f", "s16le", "-ac", "1", "-ar", "16000", "pipe:1"],
        input=aac,
        capture_output=True,
        check=True,
    ).stdout
    # real decoded audio (the first chunk's length depends on when the first segment was cut: short on a loaded machine)
    assert len(pcm) >= 2 * 1024  # at least one AAC frame (1024 samples) of decoded audio

    # Bad input: a friendly error, and the next request still works (in a new conversation: the session's first
    # exchange would otherwise stay in the prompt).
    with pytest.raises(AppError, match="No question yet"):
        client.predict(None, "fast", api_name="/respond")
    client.predict(api_name="/new_conversation")
    text, audio, status, whole = client.predict(handle_file(question_wav), "faithful", api_name="/respond")
    assert text.strip() and status.startswith("done")
    pcm, rate = soundfile.read(whole, dtype="int16")
    assert rate == SR and _same_pcm(pcm, _generated(served.echox_space, question_wav, "faithful")[1])
    client.close()


def test_a_listener_who_leaves_takes_the_question_out_of_the_batch(served, question_wav, monkeypatch):
    """gradio closes the generator of a cancelled job; its question then leaves the server's batch unanswered."""
    from gradio_client import Client, handle_file

    from modeling_echox.serving import EchoXRequestCancelled
    from modeling_echox.serving.decoding_batch import DecodingBatch

    space, step, submitted = served.echox_space, DecodingBatch.step, []

    def slow_step(self):  # a slow model: the answer takes seconds
        time.sleep(0.25)
        return step(self)

    def recording_submit(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    submit = space.server.submit
    monkeypatch.setattr(DecodingBatch, "step", slow_step)
    monkeypatch.setattr(space.server, "submit", recording_submit)
    client = Client(served.local_url, verbose=False, analytics_enabled=False)
    job = client.submit(handle_file(question_wav), "fast", api_name="/respond")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:  # the first segment has arrived
        time.sleep(0.05)
    job.cancel()
    (request,) = submitted
    with pytest.raises(EchoXRequestCancelled):
        request.result(timeout=60)
    client.close()


# ------------------------------------------------------------------------------------- a real browser (chromium)
@pytest.fixture(scope="module")
def browser(served, tmp_path_factory):
    """Debian's chromium driven by Playwright (python): no browser download, a fresh profile, no background traffic."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, permissions=["microphone"]
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


PLAYING = (
    "() => { const a = document.querySelector('#answer-audio audio'); return !!(a && a.src && a.currentTime > 0); }"
)
STATUS = "() => document.querySelector('#status')?.innerText || ''"
# The whole-answer player draws a waveform (its <audio> element stays empty); its download link holds the file.
WHOLE_ANSWER_LINK = "() => document.querySelector('#answer-wav a[download]')?.href?.endsWith('.wav') || false"
# The first 4 bytes of the file that link serves, as text.
WHOLE_ANSWER_MAGIC = """async () => {
    const response = await fetch(document.querySelector('#answer-wav a[download]').href);
    return String.fromCharCode(...new Uint8Array(await response.arrayBuffer()).slice(0, 4));
}"""


def _pick_example(page, question):
    page.get_by_text(question, exact=True).click()
    page.wait_for_function("() => document.querySelector('#question audio, #question canvas, #question wave')")


def _wait_done(page, previous=""):
    page.wait_for_function(
        "prev => { const s = document.querySelector('#status')?.innerText || ''; return s.startsWith('done') && s !== prev; }",
        arg=previous,
        timeout=60_000,
    )


def test_browser_plays_the_streamed_answer(served, browser, shots):
    if not served.echox_examples:
        pytest.skip("flite is not installed, so the page has no example to click")
    page = browser.new_page()
    try:
        page.goto(served.local_url)
        _pick_example(page, EXAMPLE_QUESTIONS[0])
        page.locator("#mode").get_by_text("fast", exact=True).click()
        clicked = time.perf_counter()
        page.click("#speak")
        page.wait_for_function(PLAYING, timeout=60_000, polling=50)
        first_audio_s = time.perf_counter() - clicked
        page.wait_for_function(
            "() => (document.querySelector('#answer-text textarea')?.value || '').length > 0", timeout=30_000
        )
        _wait_done(page)
        page.wait_for_function(WHOLE_ANSWER_LINK, timeout=30_000)  # the whole answer's wav, downloadable
        assert page.evaluate(WHOLE_ANSWER_MAGIC) == "RIFF"
        path = shots / "echox-space-answer.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"\nfirst audio playing {first_audio_s:.2f} s after the click; screenshot: {path}")
        assert path.stat().st_size > 10_000

        # Bad input in the page: a friendly toast, no traceback, and the page keeps working.
        page.locator("#question").get_by_label("Clear").click()
        page.click("#speak")
        toast = page.get_by_test_id("toast-text").filter(has_text="No question yet")
        toast.first.wait_for(state="visible", timeout=30_000)
        assert "Traceback" not in page.content()
        page.wait_for_timeout(800)  # let the toast finish sliding in
        page.screenshot(path=str(shots / "echox-space-error.png"))
        # A new conversation (the first exchange leaves the prompt), then the next question is answered and played.
        page.click("#new-conversation")
        page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('New conversation')",
                               timeout=30_000)
        before = page.evaluate(STATUS)
        _pick_example(page, EXAMPLE_QUESTIONS[1])
        page.click("#speak")
        _wait_done(page, before)
        page.wait_for_function(PLAYING, timeout=30_000, polling=50)
    finally:
        page.close()


def test_browser_starts_playing_before_the_answer_is_finished(served, browser, shots, monkeypatch):
    """A slow three-segment answer (a stand-in for a real model): the player must start while it is still being made."""
    from modeling_echox.model.streaming import EchoXStreamChunk

    t = np.arange(SR) / SR
    script = [
        (1.5, EchoXStreamChunk(word, (0.3 * np.sin(2 * np.pi * (300 + 100 * index) * t)).astype(np.float32), [], index, index == 2, SR))
        for index, word in enumerate(["One, ", "two, ", "three."])
    ]
    monkeypatch.setattr(served.echox_space.server, "submit", lambda *args, **kwargs: ScriptedRequest(script))
    if not served.echox_examples:
        pytest.skip("flite is not installed, so the page has no example to click")
    page = browser.new_page()
    try:
        page.goto(served.local_url)
        _pick_example(page, EXAMPLE_QUESTIONS[2])
        page.click("#speak")
        page.wait_for_function(PLAYING, timeout=60_000, polling=50)
        status = page.evaluate(STATUS)
        text = page.evaluate("() => document.querySelector('#answer-text textarea')?.value || ''")
        assert status.startswith("speaking"), f"audio only started once the answer was done: {status!r}"
        assert text and text != "One, two, three."
        page.screenshot(path=str(shots / "echox-space-streaming.png"), full_page=True)
        _wait_done(page)
        assert page.evaluate("() => document.querySelector('#answer-text textarea').value") == "One, two, three."
    finally:
        page.close()


def _upload(page, path):
    """Switch the question to its upload source (the last one used was the microphone) and give it a file."""
    page.locator("#question").get_by_label("Upload file").click()
    page.locator("#question input[type=file]").set_input_files(path)


def test_browser_microphone_and_upload(served, browser, shots, question_wav, tmp_path):
    """Record from chromium's fake microphone and answer it; upload a corrupt file and get a friendly message."""
    page = browser.new_page()
    try:
        page.goto(served.local_url)
        page.wait_for_selector("#speak")
        page.locator("#question").get_by_text("Record", exact=True).click()
        page.wait_for_timeout(2000)
        page.locator("#question").get_by_text("Stop", exact=False).first.click()
        page.wait_for_function("() => document.querySelector('#question audio, #question canvas, #question wave')")
        page.click("#speak")
        _wait_done(page)

        corrupt = tmp_path / "broken.wav"
        corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
        page.locator("#question").get_by_label("Clear").click()
        _upload(page, str(corrupt))
        page.wait_for_timeout(500)
        page.click("#speak")
        toast = page.get_by_test_id("toast-text").filter(has_text="Could not read this audio file")
        toast.first.wait_for(state="visible", timeout=30_000)
        page.wait_for_timeout(800)  # let the toast finish sliding in
        page.screenshot(path=str(shots / "echox-space-corrupt-upload.png"))

        page.locator("#question").get_by_label("Clear").click()
        _upload(page, question_wav)
        page.wait_for_function("() => document.querySelector('#question audio, #question canvas, #question wave')")
        before = page.evaluate(STATUS)
        page.click("#speak")
        _wait_done(page, before)
    finally:
        page.close()


# What each example question's answer must say (EchoX-mini answers only the kinds it was taught; MODEL_CARD.md).
EXAMPLE_ANSWERS = {
    "what is the capital of france": "paris",
    "what day comes after monday": "tuesday",
    "what is two plus three": "five",
    "what month comes after march": "april",
}


def test_echox_mini_answers_every_example_question_right(tmp_path):
    """The Space offers only questions its default model answers right, spoken as the Space speaks them (flite)."""
    pytest.importorskip("ctranslate2", reason="EchoX-mini's base weights (the mini extra) are not installed")
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed, so the Space has no examples")
    from modeling_echox.mini.assembly import ensure_mini

    assert set(EXAMPLE_QUESTIONS) == set(EXAMPLE_ANSWERS)
    space = EchoXSpace.from_pretrained(ensure_mini())
    for question, path in zip(EXAMPLE_QUESTIONS, synthesize_examples(tmp_path)):
        text = list(space.respond(path, "faithful"))[-1][0]
        assert EXAMPLE_ANSWERS[question] in text.lower().split(), (question, text)


def test_conversation_keeps_earlier_exchanges(space, question_wav, monkeypatch):
    """The second question goes to the server with the first exchange before it; at most MAX_EARLIER_EXCHANGES kept."""
    from modeling_echox.demo import MAX_EARLIER_EXCHANGES

    submitted = []
    submit = space.server.submit

    def recording(*args, **kwargs):
        submitted.append(kwargs.get("conversation"))
        return submit(*args, **kwargs)

    monkeypatch.setattr(space.server, "submit", recording)
    outputs = list(space.converse(question_wav, "fast", []))
    text, _, status, whole, history = outputs[-1]
    assert submitted == [None] and text and status.startswith("done") and whole
    assert [message["role"] for message in history] == ["user", "assistant"] and history[1]["content"] == text
    assert history[0]["content"][0]["audio"]["array"].dtype == np.int16  # kept as 16-bit samples
    assert text in space.transcript(history) and space.transcript([]) == ""
    second = list(space.converse(question_wav, "fast", history))[-1]
    assert [message["role"] for message in submitted[1]] == ["user", "assistant", "user"]
    assert submitted[1][0]["content"][0]["audio"]["array"].dtype == np.float32
    assert len(second[4]) == 4
    longer = second[4]
    for _ in range(MAX_EARLIER_EXCHANGES):
        longer = list(space.converse(question_wav, "fast", longer))[-1][4]
    assert len(longer) == 2 * MAX_EARLIER_EXCHANGES and longer[0]["role"] == "user"
