"""Speaking one answer: its tokens are cut into segments as they arrive, and each segment is voiced in order."""

from dataclasses import dataclass

import torch

from .generation_configuration_echox import EchoXGenerationConfig
from .segmentation import FastSegmentation, boundary_scores, segmentation_rule
from .streaming import EchoXStreamChunk
from .vocoder_streaming import vocoding_for


@dataclass
class EchoXSegment:
    """
    A segment of the answer, cut and not yet voiced: tokens `[start, end)` of the answer, the final-layer states that
    produced them `[n, H]`, their ids `[n]` and text. `index` counts from 0; `is_last` marks the end of the answer (the
    last segment can be empty when the one before it ended with the answer: it still releases the vocoder's tail).
    """

    index: int
    start: int
    end: int
    hidden_states: torch.Tensor
    token_ids: torch.LongTensor
    text: str
    is_last: bool


class EchoXVoicer:
    """
    Speaks one answer of [`EchoXForSpeechToSpeech`]. `add` takes each generated token with the final-layer state that
    produced it and returns a segment when the generation config's segmentation rule cuts one; `finish` returns the
    rest of the answer as the last segment. `voice` speaks segments in order: the echo decoder turns them into unit ids
    (all given segments in one batch), then one piecewise vocoding per answer makes each segment's audio, in the
    generation config's `vocoding_mode` ("faithful": each segment alone, as released; "crossfade": joined click-free
    to the segment before, see `vocoder_streaming.py`), and the last segment's audio ends with the vocoding's tail.

    `generate` runs one voicer per answer after the text is decoded; an [`EchoXAudioStreamer`] runs the one `generate`
    hands it while the text is decoded. Both make the same calls, so the streamed chunks join into `generate`'s
    waveform, and a chunk's text, units and audio are those of the same segment of `generate`'s output.

    `tokenizer` decodes each token's text (the "fast" rule needs it; without it the segment texts are empty).
    `unit_decoder` reads the echo decoder's ids as unit ids (`EchoXProcessor.decode_units`; default: the model's unit
    table, see `EchoXForSpeechToSpeech.speak_units`).
    """

    def __init__(self, model, generation_config: EchoXGenerationConfig, tokenizer=None, unit_decoder=None):
        self.rule = segmentation_rule(generation_config)
        if isinstance(self.rule, FastSegmentation) and tokenizer is None:
            raise ValueError("The 'fast' segmentation mode needs the tokenizer (it cuts at word boundaries).")
        self.model = model
        self.tokenizer = tokenizer
        self.unit_decoder = unit_decoder
        self.echo_max_new_tokens = generation_config.echo_max_new_tokens
        self.sampling_rate = model.config.vocoder_config.sampling_rate
        self._boundary = model.text_table[generation_config.segment_boundary_token_id].detach()
        self._vocoder_stream = vocoding_for(model.vocoder, generation_config.vocoding_mode)
        self._states: list[torch.Tensor] = []
        self._tokens: list[int] = []
        self._scores: list[float] = []
        self._texts: list[str] = []
        self._segment_start = 0
        self._segments = 0
        self._finished = False

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return len(self._tokens)

    def add(self, token: int, hidden_state: torch.Tensor) -> EchoXSegment | None:
        """Add the next token and the state `[H]` that produced it; returns the segment that ends now, if any."""
        if self._finished:
            raise ValueError("This answer is finished; an EchoXVoicer speaks one answer.")
        self._tokens.append(int(token))
        self._states.append(hidden_state)
        self._scores += boundary_scores(hidden_state[None], self._boundary)
        self._texts.append(self.tokenizer.decode([token], skip_special_tokens=True) if self.tokenizer else "")
        cut = self.rule.cut_after(self._scores, self._texts, self._segment_start)
        return None if cut is None else self._cut(cut + 1, last=False)

    def finish(self) -> EchoXSegment | None:
        """The rest of the answer as its last segment; `None` for an empty answer (nothing was or will be said)."""
        if self._finished:
            raise ValueError("This answer is finished; an EchoXVoicer speaks one answer.")
        self._finished = True
        return self._cut(len(self._tokens), last=True) if self._tokens else None

    def _cut(self, end: int, last: bool) -> EchoXSegment:
        start = self._segment_start
        if end > start:
            states = torch.stack(self._states[start:end])
        else:
            states = self._states[-1].new_zeros(0, self._states[-1].shape[-1])
        segment = EchoXSegment(
            index=self._segments,
            start=start,
            end=end,
            hidden_states=states,
            token_ids=torch.tensor(self._tokens[start:end], dtype=torch.long, device=states.device),
            text="".join(self._texts[start:end]),
            is_last=last,
        )
        self._segment_start = end
        self._segments += 1
        return segment

    @torch.no_grad()
    def voice(self, segments: list[EchoXSegment]) -> list[EchoXStreamChunk]:
        """Speak `segments` (the next ones of this answer, in order): one `EchoXStreamChunk` each."""
        spoken = [segment for segment in segments if segment.end > segment.start]
        units = self.model.speak_units(
            [segment.hidden_states for segment in spoken],
            [segment.token_ids for segment in spoken],
            max_new_tokens=self.echo_max_new_tokens,
            unit_decoder=self.unit_decoder,
        )
        return self.vocode(segments, units)

    @torch.no_grad()
    def vocode(self, segments: list[EchoXSegment], spoken_units: list[list[int]]) -> list[EchoXStreamChunk]:
        """
        The vocoder half of `voice`: `spoken_units` are the echo decoder's unit ids of the non-empty `segments`, in
        order (`echo_units_together` computes them for several answers at once). One `EchoXStreamChunk` per segment.
        """
        if len(spoken_units) != sum(segment.end > segment.start for segment in segments):
            raise ValueError("vocode needs one list of unit ids per non-empty segment.")
        units = iter(spoken_units)
        chunks = []
        for segment in segments:
            segment_units = next(units) if segment.end > segment.start else []
            audio = self._vocoder_stream.push(segment_units)
            if segment.is_last:
                audio = torch.cat([audio, self._vocoder_stream.flush()])
            chunks.append(
                EchoXStreamChunk(segment.text, audio.numpy(), segment_units, segment.index, segment.is_last, self.sampling_rate)
            )
        return chunks


@torch.no_grad()
def echo_units_together(work: list[tuple[EchoXVoicer, list[EchoXSegment]]]) -> list[list[list[int]]]:
    """
    The echo decoder's unit ids for the next segments of several answers (each voicer with its segments, in order),
    read in one batch (one per `echo_max_new_tokens` value and unit decoder) instead of one per answer: for each
    answer, the unit ids of its non-empty segments, in order, ready for that voicer's `vocode`.
    """
    units: list[list[list[int]]] = [[] for _ in work]
    groups: dict[tuple, list[tuple[int, EchoXSegment]]] = {}
    for answer, (voicer, segments) in enumerate(work):
        for segment in segments:
            if segment.end > segment.start:
                groups.setdefault((voicer.echo_max_new_tokens, voicer.unit_decoder), []).append((answer, segment))
    for (max_new_tokens, unit_decoder), members in groups.items():
        model = work[members[0][0]][0].model
        spoken = model.speak_units(
            [segment.hidden_states for _, segment in members],
            [segment.token_ids for _, segment in members],
            max_new_tokens=max_new_tokens,
            unit_decoder=unit_decoder,
        )
        for (answer, _), ids in zip(members, spoken):
            units[answer].append(ids)
    return units
