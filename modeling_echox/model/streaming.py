"""Streaming speech out: an `EchoXAudioStreamer` for `generate(..., streamer=...)`, iterable chunk by chunk."""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

_STOP = object()


@dataclass
class EchoXStreamChunk:
    """
    One spoken segment of the answer: its text, its unit ids and the audio that is final now (16 kHz float32; the
    last chunk also carries the vocoder's held-back tail). `segment` counts from 0; `is_last` marks the end.
    """

    text: str
    audio: np.ndarray
    unit_ids: list[int]
    segment: int
    is_last: bool
    sampling_rate: int = 16000


class EchoXAudioStreamer(BaseStreamer):
    """
    Streams the spoken answer of one `generate` call. `generate` hands the streamer the `EchoXVoicer` of its answer
    (`start`), made from its generation config and tokenizer; the streamer then feeds it each token with the hidden
    state that produced it, and voices every segment the voicer cuts (echo decoder + vocoder) while the LLM goes on
    decoding. Iterate over it (from another thread than `generate`'s) to get `EchoXStreamChunk`s in order; joined, their
    audio is `generate`'s waveform for the same request. One request per streamer.

    `voice_first_segment_now` (default): the first segment is voiced in `generate`'s thread, which pauses the text
    decoding meanwhile; on a CPU this gets the first audio out sooner than sharing the cores with the LLM. Later
    segments are voiced in a worker thread while the LLM goes on. The streamer leaves torch's thread settings alone:
    how many threads decode and voice is the caller's choice.

    `first_token_time` / `first_audio_time`: `time.perf_counter()` when the first answer token arrived and when the
    first audio was ready.

    ```python
    streamer = EchoXAudioStreamer()
    Thread(target=model.generate, kwargs={**inputs, "tokenizer": processor.tokenizer, "streamer": streamer}).start()
    for chunk in streamer:
        play(chunk.audio)
    ```
    (`model.stream(**inputs, tokenizer=...)` does exactly this.)
    """

    def __init__(self, timeout: float | None = None, voice_first_segment_now: bool = True):
        self.timeout = timeout
        self.voice_first_segment_now = voice_first_segment_now
        self.voicer = None
        self.eos_token_ids: set[int] = set()
        self._queue: Queue = Queue()
        self._worker = ThreadPoolExecutor(max_workers=1)
        self._pending_hidden = None
        self._prompt_seen = False
        self._finished = False
        self.first_token_time: float | None = None
        self.first_audio_time: float | None = None

    # ------------------------------------------------------------------------------------------ generate's side
    def start(self, voicer, eos_token_ids) -> None:
        """Called by `generate` before decoding: the voicer of the answer, and the ids that end it."""
        if self.voicer is not None:
            raise ValueError("This EchoXAudioStreamer already streamed a request; make a new one for each request.")
        self.voicer = voicer
        self.eos_token_ids = set(eos_token_ids)

    def put_hidden_state(self, hidden_state: torch.Tensor) -> None:
        """Called by the model's forward with the final-layer state `[1, H]` that is about to produce a token."""
        self._pending_hidden = hidden_state

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt (empty when it is given as embeddings)
            self._prompt_seen = True
            return
        if value.numel() != 1:
            raise ValueError("EchoXAudioStreamer streams one request at a time (batch size 1).")
        token = int(value.reshape(-1)[0])
        if self._finished or token in self.eos_token_ids:
            self._finished = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        segment = self.voicer.add(token, self._pending_hidden[0])
        if segment is not None:
            self._submit(segment)

    def end(self) -> None:
        segment = self.voicer.finish() if self.voicer is not None else None
        if segment is not None:
            self._submit(segment)
        self._worker.submit(self._queue.put, _STOP)
        self._worker.shutdown(wait=False)

    def fail(self, error: BaseException) -> None:
        """Hand an exception raised by `generate` to the consumer."""
        self._queue.put(error)
        self._queue.put(_STOP)
        self._worker.shutdown(wait=False)

    def _submit(self, segment) -> None:
        if segment.index == 0 and self.voice_first_segment_now:
            self._voice(segment)
        else:
            self._worker.submit(self._voice, segment)

    def _voice(self, segment) -> None:
        try:
            (chunk,) = self.voicer.voice([segment])
            if self.first_audio_time is None and len(chunk.audio):
                self.first_audio_time = time.perf_counter()
            self._queue.put(chunk)
        except Exception as error:  # surfaced to the consumer, which re-raises it
            self._queue.put(error)

    # -------------------------------------------------------------------------------------------- consumer side
    def __iter__(self):
        return self

    def __next__(self) -> EchoXStreamChunk:
        item = self._queue.get(timeout=self.timeout)
        if item is _STOP:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
