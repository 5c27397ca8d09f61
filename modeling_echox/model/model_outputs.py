"""The outputs of `EchoXForSpeechToSpeech.forward` (`EchoXOutput`) and `.generate` (`EchoXGenerationOutput`)."""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class EchoXOutput(ModelOutput):
    """
    Output of [`EchoXForSpeechToSpeech.forward`]. `loss` combines what the batch carries: stage I (speech-to-text:
    `lm_loss` + `ctc_loss_weight` × `ctc_loss`), stage II (text-to-codec: `echo_loss`) and stage III (echo training:
    `echo_loss` + capped `denoise_loss`, with the S2T loss by the paper's rule).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    ctc_loss: torch.FloatTensor | None = None
    echo_loss: torch.FloatTensor | None = None
    denoise_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    ctc_logits: torch.FloatTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EchoXGenerationOutput(ModelOutput):
    """
    Output of [`EchoXForSpeechToSpeech.generate`], per sample of the batch:
        sequences: generated text ids `[B, n]` (after the eos: pad id).
        text: decoded answers, when a tokenizer was given.
        segments: `(start, end)` token spans of each spoken segment.
        segment_unit_ids: acoustic unit ids of each segment.
        unit_ids: all unit ids of the answer.
        waveforms: the spoken answer, float32 at `sampling_rate`.
        dictation: with `adapter_output="dictation"`, the LLM token ids the model read for each speech clip (clips in
            row-major order); else None.
    """

    sequences: torch.LongTensor | None = None
    text: list[str] | None = None
    segments: list[list[tuple[int, int]]] | None = None
    segment_unit_ids: list[list[list[int]]] | None = None
    unit_ids: list[list[int]] | None = None
    waveforms: list[torch.FloatTensor] | None = None
    sampling_rate: int | None = None
    dictation: list[torch.LongTensor] | None = None
