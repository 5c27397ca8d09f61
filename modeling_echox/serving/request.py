"""One request to an `EchoXServer`: the client's handle (`EchoXRequest`) and what it ends with (`EchoXAnswer`)."""

import threading
import weakref
from dataclasses import dataclass
from queue import Empty, Queue

import numpy as np

from ..model.generation_configuration_echox import EchoXGenerationConfig
from ..model.streaming import EchoXStreamChunk

_END = object()


@dataclass
class EchoXAnswer:
    """
    The whole answer of one request, once it is complete: its text, its token ids (the end-of-answer token left out),
    the unit ids of each spoken segment, and its audio (`sampling_rate` Hz float32: the request's chunks joined).
    """

    text: str
    token_ids: list[int]
    segment_unit_ids: list[list[int]]
    audio: np.ndarray
    sampling_rate: int


class RequestChannel:
    """
    The two ends of a request: the server's engine puts the chunks, then the answer or an error (`put`, `finish`,
    `fail`); the client's `EchoXRequest` reads them and may `cancel`. Thread-safe; the engine writes from its own thread.
    """

    def __init__(self):
        self._chunks: Queue = Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self.answer: EchoXAnswer | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------------------- the engine's side
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def put(self, chunk: EchoXStreamChunk) -> None:
        self._chunks.put(chunk)

    def finish(self, answer: EchoXAnswer) -> None:
        if not self._done.is_set():
            self.answer = answer
            self._done.set()
            self._chunks.put(_END)

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()
            self._chunks.put(_END)

    # ------------------------------------------------------------------------------------------- the client's side
    def cancel(self) -> None:
        self._cancelled.set()

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)

    def get(self, timeout: float | None):
        return self._chunks.get(timeout=timeout)


@dataclass
class PendingRequest:
    """
    A submitted request, not yet admitted: its channel, its audio or conversation (as `submit` got them) and its
    generation config.
    """

    channel: RequestChannel
    audio: object
    sampling_rate: int | None
    generation_config: EchoXGenerationConfig
    conversation: list | None = None


class EchoXRequest:
    """
    A request submitted to an [`EchoXServer`]: its spoken answer arrives chunk by chunk (`EchoXStreamChunk`: the
    segment's text, its audio, its unit ids), each as soon as its segment is voiced. Iterate over it, or call `get`
    with a timeout; `result()` waits for the whole answer ([`EchoXAnswer`]). Joined, the chunks' audio is the answer's.

    A request that failed raises its error from `get`, iteration and `result`: [`EchoXInputError`] for input the
    processor refused, the model's exception otherwise. `cancel()` (or dropping the last reference to the handle: a
    client that went away) takes the request out of the batch at the next step; the other requests go on unchanged.
    """

    def __init__(self, channel: RequestChannel):
        self._channel = channel
        self._ended = False
        # A client that drops its handle without reading to the end went away: its request leaves the batch.
        self._finalizer = weakref.finalize(self, channel.cancel)

    def get(self, timeout: float | None = None) -> EchoXStreamChunk | None:
        """
        The next chunk, waiting at most `timeout` seconds (`None`: as long as it takes); `None` once every chunk has
        been handed out and the answer is complete. Raises `TimeoutError` when no chunk came in time, and the
        request's error if it failed (or `EchoXRequestCancelled` after `cancel`).
        """
        if not self._ended:
            try:
                item = self._channel.get(timeout)
            except Empty:
                raise TimeoutError(f"No chunk of the answer arrived within {timeout} s.") from None
            if item is not _END:
                return item
            self._ended = True
        if self._channel.error is not None:
            raise self._channel.error
        return None

    def __iter__(self):
        return self

    def __next__(self) -> EchoXStreamChunk:
        chunk = self.get()
        if chunk is None:
            raise StopIteration
        return chunk

    def result(self, timeout: float | None = None) -> EchoXAnswer:
        """The whole answer, once complete (waiting at most `timeout` seconds, else `TimeoutError`); or the error."""
        if not self._channel.wait(timeout):
            raise TimeoutError(f"The answer was not complete within {timeout} s.")
        if self._channel.error is not None:
            raise self._channel.error
        return self._channel.answer

    @property
    def done(self) -> bool:
        """Whether the request has ended: answered, failed or cancelled."""
        return self._channel.done

    def cancel(self) -> None:
        """Stop answering: the request leaves the batch at the engine's next step and ends with `EchoXRequestCancelled`."""
        self._channel.cancel()


__all__ = ["EchoXAnswer", "EchoXRequest"]
