"""
Synthesis of a unit sequence that arrives in pieces (one EchoX segment after another), in one of two modes
(`VOCODING_MODES`, the generation config's `vocoding_mode`): "faithful", the released EchoX's (each piece alone,
concatenated), or "crossfade" (click-free joins).
"""

import torch

from .generation_configuration_echox import VOCODING_MODES
from .vocoder import EchoXCodeHifiGan


class EchoXSegmentVocoding:
    """
    The released EchoX's vocoding: each piece is synthesized alone (its durations predicted from its own units, no
    context from the piece before) in float32, and the pieces' waveforms are concatenated as they are. Same interface
    as [`EchoXVocoderStream`]; `flush()` has nothing to release.
    """

    def __init__(self, vocoder: EchoXCodeHifiGan, speaker_id: int | None = None):
        self.vocoder = vocoder
        self.speaker_id = speaker_id
        self.durations: list[int] = []

    @torch.no_grad()
    def push(self, unit_ids: list[int] | torch.LongTensor) -> torch.FloatTensor:
        """Synthesize the next piece alone; returns its samples (float32, CPU)."""
        device = self.vocoder.unit_embedding.weight.device
        units = torch.as_tensor(unit_ids, dtype=torch.long, device=device)
        if units.numel() == 0:
            return torch.zeros(0)
        with torch.autocast(device_type=device.type, enabled=False):
            durations = self.vocoder.predict_durations(units)[0]
            output = self.vocoder(units, durations=durations, speaker_id=self.speaker_id)
        self.durations += durations.tolist()
        return output.waveform[0, : output.waveform_lengths[0]].float().cpu()

    def flush(self) -> torch.FloatTensor:
        return torch.zeros(0)


def vocoding_for(vocoder: EchoXCodeHifiGan, mode: str):
    """The piecewise synthesis of `mode` ("faithful" or "crossfade") over `vocoder`."""
    if mode == "faithful":
        return EchoXSegmentVocoding(vocoder)
    if mode == "crossfade":
        return EchoXVocoderStream(vocoder)
    raise ValueError(f"Unknown vocoding mode {mode!r}; use one of {VOCODING_MODES}.")


class EchoXVocoderStream:
    """
    Feeds the unit vocoder piece by piece. Each piece is synthesized after `left_context_units` units of what came
    before (their durations kept from when they were first predicted), so the HiFi-GAN sees its usual left context; the
    last `crossfade_frames` frames of each piece, synthesized without right context, are held back and cross-faded
    with their re-synthesis at the start of the next piece. `flush()` releases the held samples at the end.

    Concatenating everything `push`/`flush` return gives the whole answer; it matches one-shot synthesis of the joined
    units away from the joins, and has no discontinuity at them.
    """

    def __init__(
        self,
        vocoder: EchoXCodeHifiGan,
        left_context_units: int = 16,
        crossfade_frames: int = 8,
        speaker_id: int | None = None,
    ):
        if left_context_units < crossfade_frames:
            raise ValueError("left_context_units must be at least crossfade_frames (the held samples lie in the context).")
        self.vocoder = vocoder
        self.left_context_units = left_context_units
        self.crossfade_samples = crossfade_frames * vocoder.config.hop_length
        self.speaker_id = speaker_id
        device = vocoder.unit_embedding.weight.device
        self._context_units = torch.zeros(0, dtype=torch.long, device=device)
        self._context_durations = torch.zeros(0, dtype=torch.long, device=device)
        self._held = torch.zeros(0)
        self.durations: list[int] = []  # every unit's duration, in order (for comparison with one-shot synthesis)

    @torch.no_grad()
    def push(self, unit_ids: list[int] | torch.LongTensor) -> torch.FloatTensor:
        """Synthesize the next piece; returns the samples that are final now (float32, CPU)."""
        units = torch.as_tensor(unit_ids, dtype=torch.long, device=self._context_units.device)
        if units.numel() == 0:
            return torch.zeros(0)
        all_units = torch.cat([self._context_units, units])
        durations = self.vocoder.predict_durations(all_units)[0][self._context_units.numel() :]
        all_durations = torch.cat([self._context_durations, durations])
        output = self.vocoder(all_units, durations=all_durations, speaker_id=self.speaker_id)
        waveform = output.waveform[0, : output.waveform_lengths[0]].float().cpu()

        context_samples = int(self._context_durations.sum()) * self.vocoder.config.hop_length
        fresh = waveform[context_samples:]
        pieces = []
        if self._held.numel():
            held = self._held.numel()
            redone = waveform[context_samples - held : context_samples]
            fade_in = torch.linspace(0.0, 1.0, held + 2)[1:-1]
            pieces.append(self._held * (1 - fade_in) + redone * fade_in)
        keep = max(0, fresh.numel() - self.crossfade_samples)
        pieces.append(fresh[:keep])
        self._held = fresh[keep:]

        self._context_units = all_units[-self.left_context_units :]
        self._context_durations = all_durations[-self.left_context_units :]
        self.durations += durations.tolist()
        return torch.cat(pieces)

    def flush(self) -> torch.FloatTensor:
        """The held-back tail of the last piece."""
        held, self._held = self._held, torch.zeros(0)
        return held
