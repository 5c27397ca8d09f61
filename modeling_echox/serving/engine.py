"""
The server's engine: the thread that owns the LLM and writes every admitted answer, step by step.

Each turn of its loop: requests that arrived join (each prefilled alone, as a lone `generate` call would be), then one
decoding step runs over all answers being written; the segments cut along the way go to the voicing thread
(`VoicingThread`), which speaks them while the engine goes on, and finished, cancelled or failed answers leave the
batch.
"""

from __future__ import annotations

import logging

import torch

from ..model.voicing import EchoXVoicer
from .answer import AnswerInProgress
from .decoding_batch import DecodingBatch
from .errors import EchoXInputError, EchoXRequestCancelled
from .request import PendingRequest
from .voicing_thread import VoicingThread

logger = logging.getLogger(__name__)


class Engine:
    """
    The loop body of an `EchoXServer`'s thread. `admit` takes new requests into the batch; `turn` runs one decoding
    step; `abort` ends every answer being written; `close` stops the voicing thread. Not thread-safe: only the
    server's thread calls it, so the LLM and the prompt-prefix cache are used by that thread alone (the voicing thread
    uses the echo decoder and the vocoder).
    """

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.batch = DecodingBatch(model)
        self.answers: list[AnswerInProgress] = []  # being written
        self.voicing = VoicingThread(processor.tokenizer)

    def __len__(self) -> int:
        return len(self.answers)

    @torch.no_grad()
    def admit(self, pending: list[PendingRequest]) -> None:
        """Prefill each new request (its first segment goes to the voicing thread at once); a failure ends it alone."""
        for request in pending:
            if request.channel.cancelled:
                request.channel.fail(EchoXRequestCancelled("The request was cancelled before it was answered."))
                continue
            self._prepare(request)

    @torch.no_grad()
    def turn(self) -> None:
        """Drop cancelled and failed answers, then run one decoding step over the rest."""
        for answer in list(self.answers):
            if answer.channel.cancelled:
                self._end(answer, EchoXRequestCancelled("The request was cancelled."))
            elif answer.channel.done:  # its voicing failed
                self._stop_writing(answer)
        if not self.answers:
            return
        rows = {id(answer.row): answer for answer in self.answers}
        try:
            chosen = self.batch.step()
        except Exception as error:  # a failed forward leaves no usable cache: every answer being written ends
            logger.exception("EchoX decoding step failed")
            for answer in list(self.answers):
                self._end(answer, error)
            self.batch.clear()
            return
        for row, (token, state) in zip(list(self.batch.rows), chosen):
            self._take(rows[id(row)], token, state)

    def abort(self, error: BaseException) -> None:
        """End every answer being written with `error`."""
        for answer in list(self.answers):
            self._end(answer, error)

    def close(self, error: BaseException) -> None:
        """Stop the voicing thread; answers it has not completed end with `error`."""
        self.voicing.close(error)

    # ----------------------------------------------------------------------------------------------------- steps
    def _prepare(self, request: PendingRequest) -> None:
        """Features, prompt and prefill of one request; a failure ends it (its channel says why)."""
        try:
            inputs = self.processor(audio=request.audio, sampling_rate=request.sampling_rate)
        except (ValueError, TypeError, OSError) as error:
            request.channel.fail(EchoXInputError(f"This audio cannot be used: {error}"))
            return
        except Exception as error:
            request.channel.fail(error)
            return
        config = request.generation_config
        eos = config.eos_token_id
        try:
            answer = AnswerInProgress(
                channel=request.channel,
                generation_config=config,
                voicer=EchoXVoicer(self.model, config, self.processor.tokenizer),
                eos_token_ids=set([eos] if isinstance(eos, int) else (eos or [])),
            )
            answer.row, token, state = self.batch.add(inputs, config)
        except Exception as error:
            logger.exception("EchoX failed to start an answer")
            request.channel.fail(error)
            return
        self.answers.append(answer)
        self._take(answer, token, state)

    def _take(self, answer: AnswerInProgress, token: int, state: torch.Tensor) -> None:
        """
        Hand the answer its next token: a segment the rule cuts goes to the voicing thread; at eos or at its length
        limit the answer leaves the batch and its rest goes to the voicing thread as its last segment.
        """
        segments, last = [], token in answer.eos_token_ids
        if not last:
            answer.tokens.append(token)
            segment = answer.voicer.add(token, state)
            if segment is not None:
                segments.append(segment)
            last = len(answer.tokens) >= answer.generation_config.max_new_tokens
        if last:
            self._stop_writing(answer)
            segment = answer.voicer.finish()
            if segment is not None:
                segments.append(segment)
        if segments or last:
            self.voicing.hand_over(answer, segments, last)

    def _stop_writing(self, answer: AnswerInProgress) -> None:
        self.batch.remove([answer.row])
        self.answers.remove(answer)

    def _end(self, answer: AnswerInProgress, error: BaseException) -> None:
        self._stop_writing(answer)
        answer.channel.fail(error)
