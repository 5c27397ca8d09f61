"""The server's voicing thread: it speaks the segments the engine cuts, for all answers, while the engine decodes."""

from __future__ import annotations

import logging
import threading
from queue import Queue

import torch

from ..model.voicing import EchoXSegment, echo_units_together
from .answer import AnswerInProgress
from .errors import EchoXRequestCancelled

logger = logging.getLogger(__name__)

_STOP = object()


class VoicingThread:
    """
    Speaks every answer's segments in a thread of its own, so that the LLM goes on writing meanwhile. The engine hands
    over each answer's segments in order as they are cut (`hand_over`; `last` once the answer is written). Each time
    the thread wakes it takes everything handed over since: the echo decoder reads all those segments in one batch
    (`echo_units_together`), each answer's vocoder stream voices its own, and the chunks go to the clients. An answer
    whose last segment is said is complete. A failure ends the answers it hit; the thread goes on with the others.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._queue: Queue = Queue()
        self._thread = threading.Thread(target=self._run, name="echox-server-voicing", daemon=True)
        self._thread.start()

    def hand_over(self, answer: AnswerInProgress, segments: list[EchoXSegment], last: bool) -> None:
        """The answer's next segments (possibly none); `last`: the answer is written, complete it once they are said."""
        self._queue.put((answer, segments, last))

    def close(self, error: BaseException, timeout: float | None = None) -> None:
        """Stop after the segments being voiced now; answers handed over and not completed end with `error`."""
        self._queue.put((_STOP, error))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _take_all(self) -> list:
        """Everything handed over since the last batch (waiting for the first item)."""
        items = [self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get())
        return items

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                items = self._take_all()
                stop = next((item[1] for item in items if item[0] is _STOP), None)
                work: dict[int, tuple[AnswerInProgress, list[EchoXSegment], bool]] = {}
                for answer, segments, last in (item for item in items if item[0] is not _STOP):
                    _, before, _ = work.get(id(answer), (answer, [], False))
                    work[id(answer)] = (answer, before + segments, last)
                if stop is not None:
                    for answer, _, _ in work.values():
                        answer.channel.fail(stop)
                    return
                for answer, _, _ in work.values():
                    if answer.channel.cancelled:
                        answer.channel.fail(EchoXRequestCancelled("The request was cancelled."))
                self._voice([job for job in work.values() if not job[0].channel.done])

    def _voice(self, jobs: list[tuple[AnswerInProgress, list[EchoXSegment], bool]]) -> None:
        try:
            units = echo_units_together([(answer.voicer, segments) for answer, segments, _ in jobs])
        except Exception as error:
            logger.exception("EchoX echo decoding failed")
            for answer, _, _ in jobs:
                answer.channel.fail(error)
            return
        for (answer, segments, last), spoken in zip(jobs, units):
            try:
                for segment, chunk in zip(segments, answer.voicer.vocode(segments, spoken)):
                    answer.deliver(segment, chunk)
                if last:
                    answer.complete(self.tokenizer)
            except Exception as error:
                logger.exception("EchoX vocoding failed")
                answer.channel.fail(error)
