"""HiFi-GAN / CodeHiFiGAN training losses: log-mel L1 (own mel front end, HiFi-GAN's recipe), feature matching, LSGAN
generator and discriminator losses, fairseq's duration loss (MSE on log(d + 1)), and the multi-resolution STFT loss
(Parallel WaveGAN) used to train the iSTFT generator without a GAN."""

import numpy as np
import torch
from torch import nn
from transformers.audio_utils import mel_filter_bank


class LogMelSpectrogram(nn.Module):
    """
    HiFi-GAN's `mel_spectrogram`: reflect-pad by `(n_fft - hop) / 2` on both sides, STFT without centring (Hann
    window), magnitude `sqrt(re² + im² + 1e-9)`, Slaney-normalized Slaney-scale mel filters (librosa's default),
    `log(clamp(mel, 1e-5))`. `[B, S]` or `[S]` waveforms → `[B, n_mels, frames]` (frames = S // hop).

    `log_floor="add"` computes `log(mel + 1e-5)` instead of the clamp: nearly the same values, but a gradient also
    flows where the mel is below the floor. That matters at the start of training: a freshly initialized HiFi-GAN
    generator outputs ~1e-9, every mel bin is clamped and a mel-only loss has exactly zero gradient (HiFi-GAN itself
    escapes through its adversarial losses).

    `fmax=None` means `sampling_rate / 2` (HiFi-GAN's `fmax_for_loss`).
    """

    def __init__(
        self,
        sampling_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int = 1024,
        n_mels: int = 80,
        fmin: float = 0.0,
        fmax: float | None = None,
        log_floor: str = "clamp",
    ):
        super().__init__()
        if (n_fft - hop_length) % 2:
            raise ValueError("n_fft - hop_length must be even (HiFi-GAN pads by half of it on both sides).")
        if log_floor not in ("clamp", "add"):
            raise ValueError(f"log_floor must be 'clamp' or 'add', got {log_floor!r}.")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.log_floor = log_floor
        fmax = sampling_rate / 2 if fmax is None else fmax
        filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=fmin,
            max_frequency=fmax,
            sampling_rate=sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )  # [freq, mels]
        self.register_buffer("mel_basis", torch.from_numpy(np.ascontiguousarray(filters.T)).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 1:
            waveform = waveform[None]
        waveform = waveform.float()
        pad = (self.n_fft - self.hop_length) // 2
        mode = "reflect" if waveform.shape[-1] > pad else "constant"
        waveform = nn.functional.pad(waveform[:, None], (pad, pad), mode=mode)[:, 0]
        spec = torch.stft(
            waveform,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
        mel = torch.matmul(self.mel_basis, magnitude)
        if self.log_floor == "add":
            return torch.log(mel + 1e-5)
        return torch.log(torch.clamp(mel, min=1e-5))


def mel_l1_loss(mel_fn: LogMelSpectrogram, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the log-mel spectrograms of two `[B, S]` waveforms (unweighted; HiFi-GAN ×45)."""
    if generated.shape != target.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and target {tuple(target.shape)} must match.")
    return nn.functional.l1_loss(mel_fn(generated), mel_fn(target))


class MultiResolutionSTFTLoss(nn.Module):
    """
    Parallel WaveGAN's multi-resolution STFT loss: for each `(n_fft, hop_length, win_length)` resolution, spectral
    convergence `‖|S| - |Ŝ|‖_F / ‖|S|‖_F` plus the mean absolute log-magnitude difference `|log|S| - log|Ŝ||`
    (magnitudes `sqrt(re² + im² + 1e-7)`, Hann window, centred STFT); returns the mean over resolutions of
    `(spectral convergence, log-magnitude)` so the caller can weight them.
    """

    def __init__(self, resolutions=((512, 128, 512), (1024, 256, 1024), (256, 64, 256))):
        super().__init__()
        resolutions = [tuple(int(v) for v in resolution) for resolution in resolutions]
        if not resolutions or any(len(r) != 3 or r[2] > r[0] or min(r) < 1 for r in resolutions):
            raise ValueError(
                f"resolutions must be (n_fft, hop_length, win_length ≤ n_fft) triples, got {resolutions}."
            )
        self.resolutions = resolutions

    @staticmethod
    def _magnitude(waveform: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
        window = torch.hann_window(win, device=waveform.device, dtype=waveform.dtype)
        mode = "reflect" if waveform.shape[-1] > n_fft // 2 else "constant"
        spec = torch.stft(
            waveform, n_fft, hop_length=hop, win_length=win, window=window, center=True, pad_mode=mode,
            return_complex=True,
        )
        return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-7)

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if generated.shape != target.shape:
            raise ValueError(f"generated {tuple(generated.shape)} and target {tuple(target.shape)} must match.")
        if generated.dim() == 1:
            generated, target = generated[None], target[None]
        generated, target = generated.float(), target.float()
        convergence, log_magnitude = 0.0, 0.0
        for n_fft, hop, win in self.resolutions:
            fake = self._magnitude(generated, n_fft, hop, win)
            real = self._magnitude(target, n_fft, hop, win)
            convergence = convergence + torch.linalg.norm(real - fake) / torch.linalg.norm(real)
            log_magnitude = log_magnitude + nn.functional.l1_loss(torch.log(fake), torch.log(real))
        count = len(self.resolutions)
        return convergence / count, log_magnitude / count


def feature_matching_loss(real_maps: list[list[torch.Tensor]], fake_maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """HiFi-GAN's feature loss: 2 × Σ over sub-discriminators and layers of mean |real - fake| (real detached)."""
    loss = 0.0
    for real_layers, fake_layers in zip(real_maps, fake_maps):
        for real, fake in zip(real_layers, fake_layers):
            loss = loss + torch.mean(torch.abs(real.detach() - fake))
    return 2 * loss


def discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN discriminator loss: Σ mean((1 - D(real))²) + mean(D(fake)²)."""
    loss = 0.0
    for real, fake in zip(real_logits, fake_logits):
        loss = loss + torch.mean((1 - real) ** 2) + torch.mean(fake**2)
    return loss


def generator_adversarial_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN generator loss: Σ mean((1 - D(fake))²)."""
    loss = 0.0
    for fake in fake_logits:
        loss = loss + torch.mean((1 - fake) ** 2)
    return loss


def duration_loss(
    log_duration_pred: torch.Tensor, durations: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """
    fairseq's CodeHiFiGAN duration loss: MSE between the predicted log-durations and `log(d + 1)` of the target
    frame counts, averaged over the valid (mask = 1) units. The vocoder inverts it as `round(exp(log_d) - 1)`.
    """
    target = torch.log(durations.float() + 1)
    if mask is None:
        return nn.functional.mse_loss(log_duration_pred.float(), target)
    mask = mask.bool()
    return nn.functional.mse_loss(log_duration_pred.float()[mask], target[mask])


__all__ = [
    "LogMelSpectrogram",
    "MultiResolutionSTFTLoss",
    "discriminator_loss",
    "duration_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "mel_l1_loss",
]
