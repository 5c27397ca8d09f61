"""
The server's engine: one thread that owns the model and answers every admitted request, step by step.

Each turn of its loop: requests that arrived join (each prefilled alone, its first segment voiced at once), one
decoding step runs over all answers being written, the segments cut during that step are voiced (the echo decoder
reading all answers' segments in one batch, then each answer's vocoder stream), and finished, cancelled or failed
answers leave the batch.
"""

from __future__ import annotations

import logging

import torch

from ..model.voicing import EchoXVoicer, echo_units_together
from .answer import AnswerInProgress
from .decoding_batch import DecodingBatch
from .errors import EchoXInputError, EchoXRequestCancelled
from .request import PendingRequest

logger = logging.getLogger(__name__)


class Engine:
    """
    The loop body of an `EchoXServer`'s thread. `admit` takes new requests into the batch; `turn` runs one decoding
    step and voices what it cut; `abort` ends every admitted request with an error. Not thread-safe: only the
    server's thread calls it, so the model, its prompt-prefix cache and the voicers are used by that thread alone.
    """

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.batch = DecodingBatch(model)
        self.answers: list[AnswerInProgress] = []

    def __len__(self) -> int:
        return len(self.answers)

    @torch.no_grad()
    def admit(self, pending: list[PendingRequest]) -> None:
        """Prefill each new request and voice its first segment if its first token cut one; a failure ends it alone."""
        for request in pending:
            if request.channel.cancelled:
                request.channel.fail(EchoXRequestCancelled("The request was cancelled before it was answered."))
                continue
            answer = self._prepare(request)
            if answer is None:
                continue
            self.answers.append(answer)
            self._voice([answer])
            self._retire()

    @torch.no_grad()
    def turn(self) -> None:
        """Drop cancelled answers, run one decoding step over the rest, voice the segments it cut, retire finished ones."""
        for answer in self.answers:
            if answer.channel.cancelled:
                self._end(answer, EchoXRequestCancelled("The request was cancelled."))
        self._retire()
        if len(self.batch):
            writing = {id(answer.row): answer for answer in self.answers if answer.writing}
            try:
                chosen = self.batch.step()
            except Exception as error:  # a failed forward leaves no usable cache: every answer being written ends
                logger.exception("EchoX decoding step failed")
                for answer in writing.values():
                    self._end(answer, error)
                self.batch.clear()
            else:
                for row, (token, state) in zip(list(self.batch.rows), chosen):
                    self._take(writing[id(row)], token, state)
        self._voice([answer for answer in self.answers if answer.segments])
        self._retire()

    def abort(self, error: BaseException) -> None:
        """End every admitted request with `error`."""
        for answer in self.answers:
            self._end(answer, error)
        self._retire()

    # ----------------------------------------------------------------------------------------------------- steps
    def _prepare(self, request: PendingRequest) -> AnswerInProgress | None:
        """Features, prompt and prefill of one request; `None` when it failed (its channel says why)."""
        try:
            if request.conversation is not None:
                inputs = self.processor(conversation=request.conversation, sampling_rate=request.sampling_rate)
            else:
                inputs = self.processor(audio=request.audio, sampling_rate=request.sampling_rate)
        except (ValueError, TypeError, OSError) as error:
            request.channel.fail(EchoXInputError(f"This request cannot be used: {error}"))
            return None
        except Exception as error:
            request.channel.fail(error)
            return None
        config = request.generation_config
        eos = config.eos_token_id
        try:
            answer = AnswerInProgress(
                channel=request.channel,
                generation_config=config,
                voicer=EchoXVoicer(self.model, config, self.processor.tokenizer, self.processor.decode_units),
                eos_token_ids=set([eos] if isinstance(eos, int) else (eos or [])),
            )
            answer.row, token, state = self.batch.add(inputs, config)
        except Exception as error:
            logger.exception("EchoX failed to start an answer")
            request.channel.fail(error)
            return None
        self._take(answer, token, state)
        return answer

    def _take(self, answer: AnswerInProgress, token: int, state: torch.Tensor) -> None:
        """Hand the answer its next token: cut a segment if the rule says so; end it at eos or at its length limit."""
        if token in answer.eos_token_ids:
            self._stop_writing(answer)
            return
        answer.tokens.append(token)
        segment = answer.voicer.add(token, state)
        if segment is not None:
            answer.segments.append(segment)
        if len(answer.tokens) >= answer.generation_config.max_new_tokens:
            self._stop_writing(answer)

    def _stop_writing(self, answer: AnswerInProgress) -> None:
        answer.writing = False
        self.batch.remove([answer.row])
        segment = answer.voicer.finish()
        if segment is not None:
            answer.segments.append(segment)

    def _voice(self, answers: list[AnswerInProgress]) -> None:
        """Voice the cut segments of these answers and hand their chunks out; a failure ends the answers it hit."""
        answers = [answer for answer in answers if answer.segments and not answer.channel.done]
        if not answers:
            return
        work = [(answer.voicer, answer.segments) for answer in answers]
        try:
            units = echo_units_together(work)
        except Exception as error:
            logger.exception("EchoX echo decoding failed")
            for answer in answers:
                self._end(answer, error)
            return
        for answer, (voicer, segments), spoken in zip(answers, work, units):
            answer.segments = []
            try:
                chunks = voicer.vocode(segments, spoken)
            except Exception as error:
                logger.exception("EchoX vocoding failed")
                self._end(answer, error)
                continue
            for segment, chunk in zip(segments, chunks):
                answer.deliver(segment, chunk)

    def _retire(self) -> None:
        """Complete the answers that are written and voiced; forget every answer that has ended."""
        for answer in self.answers:
            if not answer.writing and not answer.segments and not answer.channel.done:
                answer.complete(self.processor.tokenizer)
        self.answers = [answer for answer in self.answers if not answer.channel.done]

    def _end(self, answer: AnswerInProgress, error: BaseException) -> None:
        if answer.writing:
            answer.writing = False
            self.batch.remove([answer.row])
        answer.segments = []
        answer.channel.fail(error)
