"""
EchoX speech-to-speech demo (a Gradio Space).

Ask a question out loud (microphone or an uploaded file) and EchoX answers in text and speech. The spoken answer
streams: each segment is voiced while the model goes on writing the next one, and the player starts as soon as the
first segment's audio arrives. Listeners are served together: every question goes to one `EchoXServer`
(modeling_echox/serving), which answers up to `CONCURRENT_ANSWERS` of them in one batch; up to `QUEUE_MAX_SIZE` more
wait in gradio's queue, and past that gradio turns new ones away. When the answer is complete, the whole of it is also given as one 16-bit WAV file: the
API endpoint `/respond` returns `(text, streamed audio playlist, status, answer.wav)`, so a `gradio_client` script
gets a playable file.

Run locally: `echox demo --model DIR`, or the Space's entry point `python spaces_demo/app.py --model DIR` (DIR is any
EchoX checkpoint directory; default: `$ECHOX_MODEL`, else EchoX-mini, built once into the user cache by `ensure_mini`).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from .memory import release_freed_memory  # noqa: E402
from .mini.assembly import default_model_dir  # noqa: E402
from .serving import EchoXInputError, EchoXServer, EchoXServerBusy  # noqa: E402

logger = logging.getLogger("echox.space")

SAMPLING_RATE = 16000
MODES = ("faithful", "fast")
CONCURRENT_ANSWERS = 8  # questions answered together (the server's batch, and gradio's concurrency for /respond)
QUEUE_MAX_SIZE = 16  # questions waiting in gradio's queue beyond those; more are turned away by gradio
STREAM_TIMEOUT_S = 300.0  # a segment that takes longer than this to arrive ends the request with a message
SILENCE_PEAK = 1e-4  # same threshold as modeling_echox.model.audio_io
# Gradio re-encodes streamed audio to AAC in one ffmpeg process and publishes only the frames ffmpeg has emitted when a
# chunk is yielded (it waits 0.1 s for the first chunk, 5 ms for later ones). On a busy CPU a segment's audio would so
# stay unpublished until the *next* segment is yielded, a whole segment late. While the model works on the next
# segment we therefore yield a one-sample "nudge" (the last sample repeated: inaudible, no click) every
# NUDGE_INTERVAL_S, at most MAX_NUDGES times per segment, so that gradio collects the frames that are ready.
NUDGE_INTERVAL_S = 0.25
MAX_NUDGES = 8
# Gradio keeps a `SessionState` (a copy of the page's component configs and last output values) for every session,
# that is every page load or `gradio_client.Client`, up to the launch option `state_session_capacity` (10000 by
# default: over 100 MB). The app keeps no state between requests, so only the most recent sessions are kept.
SESSION_CAPACITY = 256
# Earlier exchanges (question audio + answer text) a listener's conversation keeps in the prompt, as the released EchoX
# keeps earlier turns; older ones are dropped, which bounds the prompt and each session's memory (16-bit audio kept).
MAX_EARLIER_EXCHANGES = 3
# The whole-answer WAV files are written to gradio's cache: every hour, those older than an hour are deleted.
CACHE_CLEANUP_S = 3600

# Spoken example questions, synthesized with flite at start-up (never committed): questions EchoX-mini answers right
# (tests/test_space.py checks each answer).
EXAMPLE_QUESTIONS = (
    "what is the capital of france",
    "what day comes after monday",
    "what is two plus three",
    "what month comes after march",
)


class InputError(ValueError):
    """Bad user input; its message is shown to the user as is."""


# ------------------------------------------------------------------------------------------------------- helpers
def wav_bytes(audio: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> bytes:
    """Mono float audio in [-1, 1] → a complete 16-bit PCM RIFF/WAV file in memory (what gradio streams best)."""
    pcm = np.clip(np.nan_to_num(np.asarray(audio, dtype=np.float32)), -1.0, 1.0)
    pcm = np.round(pcm * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(int(sampling_rate))
        writer.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _decode_file(path: str) -> tuple[int, np.ndarray]:
    """Decode an uploaded or recorded file: soundfile first (wav/flac/ogg/mp3), then ffmpeg via pydub (webm, m4a…)."""
    import soundfile

    if not os.path.isfile(path):
        raise InputError("The audio file did not arrive. Please record or upload it again.")
    if os.path.getsize(path) == 0:
        raise InputError("The audio file is empty. Please record or upload a question.")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return int(rate), samples
    except Exception:  # not a format libsndfile reads: let ffmpeg try
        pass
    try:
        from pydub import AudioSegment

        segment = AudioSegment.from_file(path)
        data = np.array(segment.get_array_of_samples())
        scale = float(1 << (8 * segment.sample_width - 1))
        data = (data.astype(np.float64) / scale).astype(np.float32).reshape(-1, segment.channels)
        return int(segment.frame_rate), data
    except Exception as error:
        logger.info("could not decode %s: %s", path, error)
        raise InputError(
            "Could not read this audio file: it is corrupt or in a format we cannot decode. "
            "Please upload a WAV, FLAC, OGG or MP3 file, or record with the microphone."
        ) from None


def check_audio(audio, max_seconds: float) -> tuple[int, np.ndarray]:
    """
    Validate the input of the audio component (a file path, or gradio's `(sample_rate, int16 array)`) and return
    `(sample_rate, mono float32 samples)`. Raises `InputError` with a message for the user.
    """
    if audio is None:
        raise InputError("No question yet: record one with the microphone, upload a file, or pick an example.")
    if isinstance(audio, dict):  # gradio FileData-like dict (e.g. from the API)
        audio = audio.get("path") or audio.get("name")
    if isinstance(audio, (str, os.PathLike)):
        rate, samples = _decode_file(os.fspath(audio))
    elif isinstance(audio, (tuple, list)) and len(audio) == 2:
        rate, samples = audio
        samples = np.asarray(samples)
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
    else:
        raise InputError("Unsupported audio input. Please record or upload a question.")
    try:
        rate = int(rate)
    except (TypeError, ValueError):
        rate = 0
    if rate <= 0:
        raise InputError("The audio has no valid sample rate. Please record or upload it again.")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:  # (samples, channels), as soundfile, pydub and gradio give it → mono
        samples = samples.mean(axis=1)
    if samples.ndim != 1 or samples.size == 0:
        raise InputError("The audio is empty. Please record or upload a question.")
    if not np.all(np.isfinite(samples)):
        raise InputError("The audio contains invalid samples (NaN or infinity). Please record or upload it again.")
    duration = samples.size / rate
    if duration > max_seconds:
        raise InputError(
            f"The question is too long ({duration:.1f} s). Please keep it under {max_seconds:g} seconds."
        )
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise InputError("The audio is silent. Check your microphone and ask again.")
    return rate, samples


# ---------------------------------------------------------------------------------------------------- examples
def synthesize_examples(cache_dir: str | os.PathLike | None = None, questions=EXAMPLE_QUESTIONS) -> list[str]:
    """
    Speak the example questions with flite into `cache_dir` (default: `$ECHOX_EXAMPLES_DIR`, else a folder in the
    system temp dir) and return the wav paths; files already there are reused. Returns `[]` when flite is missing
    or fails, so the app simply offers no examples.
    """
    flite = shutil.which("flite")
    if flite is None:
        logger.warning("flite not found: the demo starts without example questions")
        return []
    folder = Path(cache_dir or os.environ.get("ECHOX_EXAMPLES_DIR") or Path(tempfile.gettempdir()) / "echox-space-examples")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for question in questions:
        target = folder / (question.replace(" ", "_") + ".wav")
        if not target.is_file() or target.stat().st_size <= 44:
            partial = target.with_suffix(f".{os.getpid()}.tmp.wav")
            try:
                subprocess.run(
                    [flite, "-voice", "slt", "-t", question, "-o", str(partial)],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                os.replace(partial, target)
            except (OSError, subprocess.SubprocessError) as error:
                logger.warning("flite could not speak %r (%s); skipping it", question, error)
                partial.unlink(missing_ok=True)
                continue
        paths.append(str(target))
    return paths


def _with_float_audio(message: dict) -> dict:
    """A conversation message whose 16-bit audio parts (as the Space keeps them) are float32 in [-1, 1]."""
    if not isinstance(message.get("content"), list):
        return message
    parts = []
    for part in message["content"]:
        if part.get("type") == "audio":
            clip = part["audio"]
            part = {**part, "audio": {**clip, "array": clip["array"].astype(np.float32) / 32767.0}}
        parts.append(part)
    return {**message, "content": parts}


# -------------------------------------------------------------------------------------------------- the space
class EchoXSpace:
    """
    The demo's state (model, processor and the `EchoXServer` that answers every listener's question) and its streaming
    answer function, usable without a web server.
    """

    def __init__(self, model, processor, stream_timeout: float = STREAM_TIMEOUT_S):
        self.model = model
        self.processor = processor
        self.max_seconds = float(getattr(processor, "max_audio_seconds", 30.0))
        self.stream_timeout = stream_timeout
        self.default_mode = getattr(model.config, "segmentation_mode", "faithful")
        # Gradio's queue holds the questions that wait (QUEUE_MAX_SIZE) and hands the server at most
        # CONCURRENT_ANSWERS at a time, so the server keeps no queue of its own.
        self.server = EchoXServer(model, processor, max_batch_size=CONCURRENT_ANSWERS, max_queue_size=0)

    @classmethod
    def from_pretrained(cls, model_dir: str) -> EchoXSpace:
        from .model.loading import load_echox

        model, processor = load_echox(model_dir)
        return cls(model, processor)

    def respond(
        self, audio, mode: str | None = None, history: list | None = None
    ) -> Iterator[tuple[str, bytes | None, str, bytes | None]]:
        """
        Answer one spoken question (through the server, together with the other listeners' questions). Yields
        `(answer text so far, wav bytes of the new audio or None, status, None)` once per voiced segment, and every
        `NUDGE_INTERVAL_S` without one (a one-sample nudge, see `NUDGE_INTERVAL_S`, or the status alone: gradio
        closes the generator of a cancelled request only between yields), then, when the answer is complete,
        `(answer text, None, "done …" status, the whole answer as one 16-bit wav file, or None if it has no audio)`.
        Bad input and failures raise `gr.Error` with a friendly message (never a traceback). When the request ends,
        however it ends, the memory it freed is returned to the system (`release_freed_memory`). `history`: earlier
        conversation messages that go into the prompt before the question; once the answer is complete, this exchange
        (the question's audio as 16-bit samples, the answer's text) is appended to it in place, and only the last
        `MAX_EARLIER_EXCHANGES` exchanges are kept (see `converse`).
        """
        try:
            yield from self._respond(audio, mode, history)
        finally:
            release_freed_memory()

    def converse(self, audio, mode: str | None, history: list | None):
        """
        `respond` within a conversation: `history` (a gradio `State`) holds the earlier exchanges as conversation
        messages, which go into the prompt before this question. Yields `respond`'s outputs plus the history, which
        gains this exchange (question audio, answer text) once the answer is complete; at most
        `MAX_EARLIER_EXCHANGES` exchanges are kept.
        """
        history = list(history or [])
        for outputs in self.respond(audio, mode, history=history):
            yield (*outputs, history)

    @staticmethod
    def transcript(history: list | None) -> str:
        """The conversation so far, as the page shows it (the answers; the questions were spoken)."""
        answers = [message["content"] for message in history or [] if message["role"] == "assistant"]
        if not answers:
            return ""
        lines = [f"{i}. (spoken question) → {answer}" for i, answer in enumerate(answers, 1)]
        return "Earlier in this conversation (kept in the prompt):\n\n" + "\n".join(lines)

    def _respond(self, audio, mode: str | None, history: list | None = None):
        started = time.perf_counter()
        mode = mode if mode in MODES else self.default_mode
        try:
            rate, samples = check_audio(audio, self.max_seconds)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        question = None
        if history is not None:  # kept as 16-bit samples (half the memory of float32) in the listener's history
            pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
            question = {"role": "user", "content": [{"type": "audio", "audio": {"array": pcm, "sampling_rate": rate}}]}
        try:
            if history:
                conversation = [_with_float_audio(message) for message in [*history, question]]
                request = self.server.submit(conversation=conversation, segmentation_mode=mode)
            else:
                request = self.server.submit(samples, sampling_rate=rate, segmentation_mode=mode)
        except EchoXServerBusy:
            raise gr.Error("EchoX is answering as many questions as it can. Please ask again in a moment.") from None

        text, seconds, first_audio, segments, nudges, last_sample = "", 0.0, None, 0, 0, None
        pieces, out_rate = [], SAMPLING_RATE  # the answer's audio, for the whole-answer wav
        waited = 0.0  # since the last chunk
        try:
            while True:
                try:
                    chunk = request.get(timeout=NUDGE_INTERVAL_S)
                except TimeoutError:  # no new segment for NUDGE_INTERVAL_S
                    waited += NUDGE_INTERVAL_S
                    if waited >= self.stream_timeout:
                        raise
                    status = self._status(mode, segments, seconds, first_audio, started, False)
                    if last_sample is not None and nudges < MAX_NUDGES:
                        nudges += 1  # see NUDGE_INTERVAL_S: release the audio gradio's encoder still holds
                        yield text, wav_bytes(last_sample, out_rate), status, None
                    else:  # the status ticks on, and gradio can close the generator of a listener who left
                        yield text, None, status, None
                    continue
                if chunk is None:
                    break
                waited = 0.0
                segments += 1
                text += chunk.text
                audio_out = None
                if chunk.audio is not None and chunk.audio.size:
                    if first_audio is None:
                        first_audio = time.perf_counter() - started
                    seconds += chunk.audio.size / chunk.sampling_rate
                    pieces.append(chunk.audio)
                    out_rate = chunk.sampling_rate
                    audio_out = wav_bytes(chunk.audio, out_rate)
                    last_sample, nudges = chunk.audio[-1:], 0
                yield text, audio_out, self._status(mode, segments, seconds, first_audio, started, False), None
        except EchoXInputError as error:  # the processor's own validation
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:
            logger.exception("EchoX failed while answering")
            raise gr.Error("Sorry, something went wrong while answering. Please try again.", title="Error") from None
        finally:
            request.cancel()  # a listener who left takes the question out of the batch (no-op once answered)
        if segments == 0:
            yield "", None, "The model gave an empty answer.", None
            return
        whole = wav_bytes(np.concatenate(pieces), out_rate) if pieces else None
        if history is not None and text:
            history[:] = [*history, question, {"role": "assistant", "content": text}][-2 * MAX_EARLIER_EXCHANGES :]
        yield text, None, self._status(mode, segments, seconds, first_audio, started, True), whole

    @staticmethod
    def _status(mode, segments, seconds, first_audio, started, done) -> str:
        first = f"first audio after {first_audio:.2f} s" if first_audio is not None else "no audio yet"
        state = "done" if done else "speaking…"
        return (
            f"{state} · mode `{mode}` · {segments} segment(s) · {seconds:.2f} s of speech · {first} · "
            f"{time.perf_counter() - started:.2f} s elapsed"
        )


DESCRIPTION = """\
# EchoX: speech-to-speech assistant
Ask a question out loud (microphone or file, at most {max_seconds:g} s), or pick an example, then press **Speak**.
The spoken answer streams: it starts playing while the rest of the answer is still being written. Your earlier
questions and answers stay in the prompt, as in the original EchoX (the last {kept} exchanges); **New conversation**
starts afresh.
Up to {concurrent} listeners are answered together; {queued} more can wait in the queue.
**Segmentation** chooses where the answer is cut into spoken pieces: `faithful` follows the original EchoX rule,
`fast` cuts earlier at word boundaries so that speech starts sooner.
Model: `{model_dir}`.
"""


def build_demo(model_dir: str, space: EchoXSpace | None = None, examples_dir: str | None = None) -> gr.Blocks:
    """The Gradio app for the checkpoint in `model_dir` (pass `space` to reuse an already loaded model)."""
    space = space or EchoXSpace.from_pretrained(model_dir)
    example_paths = synthesize_examples(examples_dir)

    with gr.Blocks(
        title="EchoX speech-to-speech",
        delete_cache=(CACHE_CLEANUP_S, CACHE_CLEANUP_S),
    ) as demo:
        gr.Markdown(
            DESCRIPTION.format(
                max_seconds=space.max_seconds,
                model_dir=os.path.basename(os.path.normpath(model_dir)),
                concurrent=space.server.max_batch_size,
                kept=MAX_EARLIER_EXCHANGES,
                queued=QUEUE_MAX_SIZE,
            )
        )
        with gr.Row():
            with gr.Column():
                question = gr.Audio(
                    sources=["microphone", "upload"],
                    type="filepath",
                    label="Your question",
                    elem_id="question",
                )
                mode = gr.Radio(
                    list(MODES), value=space.default_mode, label="Segmentation mode", elem_id="mode"
                )
                with gr.Row():
                    speak = gr.Button("Speak", variant="primary", elem_id="speak")
                    new_conversation = gr.Button("New conversation", elem_id="new-conversation")
                if example_paths:
                    gr.Examples(
                        examples=[[path] for path in example_paths],
                        inputs=[question],
                        example_labels=[Path(p).stem.replace("_", " ") for p in example_paths],
                        label="Example questions",
                        cache_examples=False,
                    )
            with gr.Column():
                answer_audio = gr.Audio(
                    label="Spoken answer",
                    streaming=True,
                    autoplay=True,
                    interactive=False,
                    elem_id="answer-audio",
                )
                answer_text = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer-text")
                status = gr.Markdown("", label="Status", elem_id="status")
                # The whole answer as one wav file once it is complete: a playable file for API clients (the
                # streamed output reaches them as an HLS playlist of AAC segments) and a download in the page.
                answer_wav = gr.Audio(
                    label="Whole answer (WAV)",
                    format="wav",
                    interactive=False,
                    elem_id="answer-wav",
                )
                transcript = gr.Markdown("", elem_id="conversation")
        history = gr.State([])  # this listener's earlier exchanges (EchoXSpace.converse)

        new_conversation.click(
            lambda: ([], "", None, "New conversation: the next question starts it.", None, ""),
            outputs=[history, answer_text, answer_audio, status, answer_wav, transcript],
            api_name="new_conversation",
        )
        answered = speak.click(
            space.converse,
            inputs=[question, mode, history],
            outputs=[answer_text, answer_audio, status, answer_wav, history],
            api_name="respond",
            concurrency_limit=space.server.max_batch_size,  # every listener's question goes to the one server
        )
        answered.then(space.transcript, inputs=[history], outputs=[transcript], api_name=False)
    demo.queue(max_size=QUEUE_MAX_SIZE)
    demo.echox_space = space  # for tests and callers that want the loaded model
    demo.echox_examples = example_paths
    return demo


def launch_kwargs(demo: gr.Blocks) -> dict:
    """Launch options every caller needs: the example folder must be servable; few sessions are kept (see above)."""
    folders = sorted({str(Path(p).parent) for p in getattr(demo, "echox_examples", [])})
    return {"allowed_paths": folders, "ssr_mode": False, "state_session_capacity": SESSION_CAPACITY}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="EchoX speech-to-speech Gradio demo")
    parser.add_argument(
        "--model",
        default=None,
        help="EchoX checkpoint directory (default: $ECHOX_MODEL, else EchoX-mini, built once into the user cache)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    return parser


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        demo = build_demo(default_model_dir(args.model))
    except OSError as error:  # a missing or incomplete checkpoint directory
        raise SystemExit(f"echox demo: {error}") from None
    demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs(demo))


if __name__ == "__main__":
    main()
