"""One answer in the making: its client's channel, its voicer, and what it has written and said so far."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..model.generation_configuration_echox import EchoXGenerationConfig
from ..model.streaming import EchoXStreamChunk
from ..model.voicing import EchoXSegment, EchoXVoicer
from .decoding_batch import DecodingRow
from .request import EchoXAnswer, RequestChannel


@dataclass(eq=False)
class AnswerInProgress:
    """
    An admitted request: its row in the decoding batch, the tokens written so far, the segments cut and not yet
    voiced (`segments`), and what its client has been given (`deliver` each voiced chunk, then `complete`). `writing`
    is true until the LLM has written all of it; once every segment is voiced too, it is complete.
    """

    channel: RequestChannel
    generation_config: EchoXGenerationConfig
    voicer: EchoXVoicer
    eos_token_ids: set[int]
    row: DecodingRow | None = None
    tokens: list[int] = field(default_factory=list)
    writing: bool = True
    segments: list[EchoXSegment] = field(default_factory=list)  # cut, not voiced yet
    chunks: list[EchoXStreamChunk] = field(default_factory=list)
    segment_unit_ids: list[list[int]] = field(default_factory=list)  # of the non-empty segments, as `generate` gives them

    def deliver(self, segment: EchoXSegment, chunk: EchoXStreamChunk) -> None:
        """Hand the client the chunk of a voiced segment."""
        self.chunks.append(chunk)
        if segment.end > segment.start:
            self.segment_unit_ids.append(chunk.unit_ids)
        self.channel.put(chunk)

    def complete(self, tokenizer) -> None:
        """Everything is written and said: hand the client the whole answer."""
        audio = [chunk.audio for chunk in self.chunks]
        self.channel.finish(
            EchoXAnswer(
                text=tokenizer.decode(self.tokens, skip_special_tokens=True),
                token_ids=list(self.tokens),
                segment_unit_ids=list(self.segment_unit_ids),
                audio=np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32),
                sampling_rate=self.voicer.sampling_rate,
            )
        )
