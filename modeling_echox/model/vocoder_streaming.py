"""Click-free synthesis of a unit sequence that arrives in pieces (one EchoX segment after another)."""

import torch

from .vocoder import EchoXCodeHifiGan


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
