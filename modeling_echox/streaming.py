"""Streaming speech out: an `EchoXAudioStreamer` for `generate(..., streamer=...)`, iterable chunk by chunk."""

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Queue

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from .segmentation import FastSegmentation, boundary_scores, segmentation_rule
from .vocoder_streaming import EchoXVocoderStream

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
    Receives the tokens (and, from the model, the hidden states that produced them) of a running `generate`, cuts the
    answer into segments as they complete, and voices each segment (echo decoder + vocoder) in a worker thread while
    the LLM goes on decoding. Iterate over it (from another thread than `generate`'s) to get `EchoXStreamChunk`s in
    order. One request at a time.

    `voice_first_segment_now` (default): the first segment is voiced in `generate`'s thread, which pauses the text
    decoding meanwhile; on a CPU this gets the first audio out sooner than sharing the cores with the LLM. Later
    segments are voiced in the worker while the LLM goes on.

    `speculate_first_segment` (off by default): with a rule that cuts at word boundaries ("fast"), a first segment is
    already voiced in a thread of its own while the LLM decodes the token that confirms its cut, on the guess that
    this token starts a new word. A right guess is used as is (`first_segment_speculated` tells); a wrong one is
    dropped and the segment is voiced when it really ends. The audio is the same either way. It pays only when the
    cores have room beside the LLM: on the 2-core CPU it made EchoX-mini's first audio later (MODEL_CARD.md).

    `split_cores` (off by default): `generate` encodes and prefills the prompt on as many torch threads as the thread
    that made the streamer has, then decodes on one while the voicing threads use one each (the last segment is voiced
    on all of them again), so that the voicing does not fight the LLM for the cores. `generate`'s thread gets its own
    count back when it is done, and torch's default for new threads is left as it was. On the 2-core CPUs measured it
    was level for "fast", and for "faithful", whose one segment waits for the whole answer decoded on one thread, it
    ranged from 20 ms sooner to 144 ms later to the first audio (MODEL_CARD.md, latency); it was the default before
    session 19.

    ```python
    streamer = EchoXAudioStreamer(model, processor.tokenizer)
    Thread(target=model.generate, kwargs={**inputs, "streamer": streamer}).start()
    for chunk in streamer:
        play(chunk.audio)
    ```
    (`model.stream(**inputs, tokenizer=...)` does exactly this.)
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        segmentation_mode: str | None = None,
        timeout: float | None = None,
        voice_first_segment_now: bool = True,
        speculate_first_segment: bool = False,
        split_cores: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.rule = segmentation_rule(model.config, segmentation_mode)
        if isinstance(self.rule, FastSegmentation) and tokenizer is None:
            raise ValueError("The 'fast' segmentation mode needs the tokenizer (it cuts at word boundaries).")
        self.timeout = timeout
        self.voice_first_segment_now = voice_first_segment_now
        self.speculate_first_segment = speculate_first_segment
        self.sampling_rate = model.config.vocoder_config.sampling_rate
        self.eos_token_ids: set[int] = set()
        self._boundary = model.text_table[model.config.segment_boundary_token_id].detach()
        self._queue: Queue = Queue()
        self.split_cores = split_cores
        self._threads = torch.get_num_threads()  # for the prompt (and the last segment) when splitting the cores
        one_thread = {"initializer": torch.set_num_threads, "initargs": (1,)} if split_cores else {}
        self._worker = ThreadPoolExecutor(max_workers=1, **one_thread)
        self._speculator = ThreadPoolExecutor(max_workers=1, **one_thread)
        if split_cores:
            # Start the voicing threads now: `torch.set_num_threads` also sets the count that threads started later
            # begin with, so it is put back here, before `generate`'s thread (or any other) starts.
            for executor in (self._worker, self._speculator) if speculate_first_segment else (self._worker,):
                executor.submit(int).result()
            torch.set_num_threads(self._threads)
        self._speculation = None  # (tokens it covers, future of (units, audio, vocoder stream)) for the first segment
        self._vocoder_stream = EchoXVocoderStream(model.vocoder)
        self._pending_hidden = None
        self._prompt_seen = False
        self._finished = False
        self._states, self._scores, self._texts, self._tokens = [], [], [], []
        self._segment_start = 0
        self._segments = 0
        self.first_token_time: float | None = None
        self.first_audio_time: float | None = None
        self.first_segment_speculated = False

    # ------------------------------------------------------------------------------------------ generate's side
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
            if self.split_cores:
                torch.set_num_threads(1)
        state = self._pending_hidden[0]
        self._tokens.append(token)
        self._states.append(state)
        self._scores += boundary_scores(state[None], self._boundary)
        self._texts.append(self.tokenizer.decode([token], skip_special_tokens=True) if self.tokenizer else "")
        cut = self.rule.cut_after(self._scores, self._texts, self._segment_start)
        if cut is not None:
            self._submit(self._segment_start, cut + 1, last=False)
            self._segment_start = cut + 1
        elif self._segments == 0 and self.speculate_first_segment:
            guess = self.rule.cut_if_next_starts_word(self._scores, self._texts, 0)
            if guess is not None:
                if self._speculation is not None:
                    self._speculation[1].cancel()  # a wrong guess that has not started yet
                states = torch.stack(self._states[: guess + 1])
                tokens = torch.tensor(self._tokens[: guess + 1], device=states.device)
                self._speculation = (guess + 1, self._speculator.submit(self._voice_alone, states, tokens))

    def end(self) -> None:
        if self.split_cores:
            torch.set_num_threads(self._threads)
        if self._segment_start < len(self._tokens):
            self._submit(self._segment_start, len(self._tokens), last=True)
        self._worker.submit(self._queue.put, _STOP)
        self._worker.shutdown(wait=False)
        self._speculator.shutdown(wait=False)

    @contextmanager
    def generating(self):
        """
        Wraps the work of `generate` (in `generate`'s thread): with `split_cores`, the streamer's thread count for the
        prompt, one thread for decoding from the first token on (set in `put`), and the thread's own count at exit.
        """
        if not self.split_cores:
            yield
            return
        own = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            yield
        finally:
            torch.set_num_threads(own)

    def fail(self, error: BaseException) -> None:
        """Hand an exception raised by `generate` to the consumer."""
        self._queue.put(error)
        self._queue.put(_STOP)

    def _submit(self, start: int, end: int, last: bool) -> None:
        states = torch.stack(self._states[start:end])
        tokens = torch.tensor(self._tokens[start:end], device=states.device)
        text = "".join(self._texts[start:end])
        if self._segments == 0 and self.voice_first_segment_now:
            self._voice(self._segments, states, tokens, text, last)
        else:
            self._worker.submit(self._voice, self._segments, states, tokens, text, last)
        self._segments += 1

    @torch.no_grad()
    def _voice_alone(self, states: torch.Tensor, tokens: torch.LongTensor):
        """Units and audio of a first segment, from a vocoder stream of its own (kept only if the guess was right)."""
        units = self.model.speak_units([states], [tokens])[0]
        stream = EchoXVocoderStream(self.model.vocoder)
        return units, stream.push(units), stream

    @torch.no_grad()
    def _voice(self, index: int, states: torch.Tensor, tokens: torch.LongTensor, text: str, last: bool) -> None:
        try:
            if index == 0 and self._speculation is not None and self._speculation[0] == len(states):
                units, audio, self._vocoder_stream = self._speculation[1].result()
                self.first_segment_speculated = True
            else:
                units = self.model.speak_units([states], [tokens])[0]
                audio = self._vocoder_stream.push(units)
            if last:
                audio = torch.cat([audio, self._vocoder_stream.flush()])
            if self.first_audio_time is None and audio.numel():
                self.first_audio_time = time.perf_counter()
            self._queue.put(EchoXStreamChunk(text, audio.numpy(), units, index, last, self.sampling_rate))
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
