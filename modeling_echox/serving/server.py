"""`EchoXServer`: many spoken questions answered at once by one EchoX model, each streamed to its own client."""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque

from ..model.generation_configuration_echox import EchoXGenerationConfig
from ..model.segmentation import segmentation_rule
from .engine import Engine
from .errors import EchoXServerBusy, EchoXServerClosed
from .request import EchoXRequest, PendingRequest, RequestChannel

logger = logging.getLogger(__name__)


class EchoXServer:
    """
    Serves one [`EchoXForSpeechToSpeech`] and its [`EchoXProcessor`] to many clients at once. `submit` hands over a
    spoken question and returns at once an [`EchoXRequest`]: the answer's chunks (`EchoXStreamChunk`: text, 16 kHz
    audio, unit ids) arrive on it as soon as each segment is voiced, and `result()` gives the whole answer.

    One thread of the server owns the model. Requests that arrive while others are being answered join them at the
    next decoding step, and leave as soon as they are answered (or cancelled): the LLM writes every answer in one
    batched forward per token, and the echo decoder reads the segments cut at a step for all answers together. Each
    request is prefilled on its own as a lone `generate` call would be, so the answers are `generate`'s: with greedy
    decoding the same text, units and audio (floating-point effects of batching aside; none seen in the tests).

    Limits: at most `max_batch_size` requests are answered together, and `max_queue_size` more wait for a place;
    past that `submit` raises [`EchoXServerBusy`]. Input the processor refuses fails that request alone
    ([`EchoXInputError`]); a failure inside the model ends the requests it hit, and the server goes on with the next.

    The server uses the model alone while it runs (do not call the model from other threads meanwhile), on torch's
    intra-op threads as the caller set them (`torch.set_num_threads`, or `modeling_echox.torch_threads`): the Whisper
    features, the LLM and the voicing all run in the server's thread. `close()` (or leaving a `with` block) stops it;
    requests not answered by then end with [`EchoXServerClosed`].

    ```python
    with EchoXServer(model, processor) as server:
        request = server.submit("question.wav", segmentation_mode="fast")
        for chunk in request:
            play(chunk.audio)
        print(request.result().text)
    ```
    """

    def __init__(self, model, processor, max_batch_size: int = 8, max_queue_size: int = 16):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer of at least 1, got {max_batch_size!r}.")
        if isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int) or max_queue_size < 0:
            raise ValueError(f"max_queue_size must be an integer of at least 0, got {max_queue_size!r}.")
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._engine = Engine(model, processor)
        self._state = threading.Condition()
        self._waiting: deque[PendingRequest] = deque()
        self._taken: list[RequestChannel] = []  # submitted, not ended: what the limits count
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="echox-server", daemon=True)
        self._thread.start()
        # A server still running when the interpreter exits is closed first (its thread would otherwise be cut off
        # inside torch, which aborts the process with "terminate called without an active exception").
        atexit.register(_close_at_exit, weakref.ref(self))

    def submit(
        self, audio=None, sampling_rate: int | None = None, conversation=None, **generation_kwargs
    ) -> EchoXRequest:
        """
        Ask one spoken question. `audio`: what `EchoXProcessor` takes for one clip (a file path, an array with
        `sampling_rate`, a `{"array", "sampling_rate"}` dict); or, instead, `conversation`: the earlier turns and the
        question, as `EchoXProcessor(conversation=...)` takes one. `generation_kwargs`: generation settings of this
        request (`segmentation_mode="fast"`, `max_new_tokens=...`, any field of the model's `EchoXGenerationConfig`).

        Raises at once `ValueError` for settings the server cannot use (beam search, an unknown field or segmentation
        mode), [`EchoXServerBusy`] when the server is full and [`EchoXServerClosed`] after `close`. Problems with the
        audio itself are found when the request is prepared and end that request with [`EchoXInputError`].
        """
        if (audio is None) == (conversation is None):
            raise ValueError(
                "EchoXServer.submit needs the audio of a question (a path, an array or a dict) or a conversation, "
                "not both."
            )
        config = self._generation_config(generation_kwargs)
        channel = RequestChannel()
        with self._state:
            if self._closed:
                raise EchoXServerClosed("This EchoXServer is closed.")
            # Requests count until they end or are cancelled (a cancelled one leaves the batch at the next step).
            self._taken = [taken for taken in self._taken if not (taken.done or taken.cancelled)]
            if len(self._taken) >= self.max_batch_size + self.max_queue_size:
                waiting = sum(not request.channel.cancelled for request in self._waiting)
                raise EchoXServerBusy(
                    f"EchoX is busy: {len(self._taken) - waiting} questions are being answered and {waiting} are "
                    f"waiting, the most this server takes ({self.max_batch_size} answered together, "
                    f"{self.max_queue_size} waiting). Please try again in a moment."
                )
            self._taken.append(channel)
            self._waiting.append(PendingRequest(channel, audio, sampling_rate, config, conversation))
            self._state.notify()
        return EchoXRequest(channel)

    def close(self, timeout: float | None = None) -> None:
        """Stop the server after its current step; requests not answered by then end with `EchoXServerClosed`."""
        with self._state:
            self._closed = True
            self._state.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EchoXServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- internals
    def _generation_config(self, kwargs: dict) -> EchoXGenerationConfig:
        generation = self.model.generation_config
        config = EchoXGenerationConfig.from_generation_config(generation, generation)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"Unknown generation settings for EchoXServer.submit: {', '.join(sorted(unused))}.")
        config.validate()
        if (config.num_beams or 1) > 1:
            raise ValueError("EchoXServer decodes greedily or by sampling (num_beams=1); beam search is not served.")
        if config.max_new_tokens is None:
            raise ValueError("EchoXServer needs max_new_tokens (in the model's generation config, or per request).")
        if config.use_cache is False:
            raise ValueError("EchoXServer decodes with the key/value cache; use_cache=False is not served.")
        segmentation_rule(config)  # an unknown segmentation mode is refused now
        return config

    def _run(self) -> None:
        error: BaseException = EchoXServerClosed("The EchoX server was closed before this request was answered.")
        try:
            while True:
                with self._state:
                    while not self._waiting and not len(self._engine) and not self._closed:
                        self._state.wait()
                    if self._closed:
                        break
                    room = self.max_batch_size - len(self._engine)
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._engine.admit(admitted)
                self._engine.turn()
        except BaseException as failure:  # a fault of the loop itself: nothing more can be answered
            logger.exception("The EchoX server stopped")
            error = failure
        finally:
            with self._state:
                self._closed = True
                pending, self._waiting = list(self._waiting), deque()
            self._engine.abort(error)
            for request in pending:
                request.channel.fail(error)


def _close_at_exit(server_ref: weakref.ref) -> None:
    server = server_ref()
    if server is not None and not server.closed:
        server.close(timeout=5.0)
