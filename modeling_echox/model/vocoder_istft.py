"""A light Vocos-style generator for the unit vocoder (`EchoXVocoderConfig.generator_type == "istft"`): ConvNeXt blocks
over the duration-expanded unit frames predict a magnitude and a phase per STFT bin, and an inverse STFT turns them
into the waveform. No upsampling convolutions, so it trains to intelligible speech on a CPU in minutes (mel L1 +
multi-resolution STFT losses, no GAN), where the HiFi-GAN generator needs days of GAN training."""

import math

import torch
from torch import nn

from .configuration_echox import EchoXVocoderConfig


def _zero_padding(hidden_states: torch.Tensor, lengths: torch.LongTensor) -> torch.Tensor:
    """Zeroes the time steps of `[B, C, T]` states from each sequence's length on."""
    padding = torch.arange(hidden_states.shape[-1], device=hidden_states.device) >= lengths[:, None]
    return hidden_states.masked_fill(padding[:, None, :], 0.0)


class EchoXConvNeXtBlock(nn.Module):
    """ConvNeXt block (as in Vocos): depthwise conv (kernel 7) → LayerNorm → Linear → GELU → Linear → layer scale,
    plus the residual. `[B, C, T]` in and out."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.layer_scale_init = layer_scale_init
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, hidden_states: torch.Tensor, lengths: torch.LongTensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.dwconv(hidden_states).transpose(1, 2)  # B x T x C
        hidden_states = self.pwconv2(self.act(self.pwconv1(self.norm(hidden_states))))
        hidden_states = (self.gamma * hidden_states).transpose(1, 2)
        return _zero_padding(residual + hidden_states, lengths)


class EchoXIstftGenerator(nn.Module):
    """
    Unit frames `[B, C, T]` (50 Hz at 16 kHz) → waveform `[B, T × hop_length]`:

    1. each frame is repeated `istft_upsample` times (50 Hz → 100 Hz with the defaults),
    2. a kernel-7 input convolution to `istft_dim` channels, LayerNorm,
    3. `istft_layers` ConvNeXt blocks, LayerNorm,
    4. a linear head to `istft_n_fft + 2` values per frame: log-magnitude (clamped at log 100, then exp) and phase
       (as cos / sin) of the `istft_n_fft // 2 + 1` bins,
    5. `torch.istft` (Hann window of `istft_n_fft` samples, hop `istft_hop_length`, `center=True`) to exactly
       `frames × istft_hop_length` samples, clamped to [-1, 1].

    Batches may mix lengths: the padding is zeroed before every convolution, and the inverse STFT runs per sequence on
    its own frames (an overlap-add over the batch would let padding frames change the window normalization at the
    end of shorter sequences), so each sequence gets the waveform it would get alone.
    """

    max_log_magnitude = math.log(100.0)

    def __init__(self, config: EchoXVocoderConfig):
        super().__init__()
        in_dim = config.unit_embed_dim + config.spkr_embed_dim
        dim = config.istft_dim
        self.upsample = config.istft_upsample
        self.n_fft, self.hop = config.istft_n_fft, config.istft_hop_length
        self.conv_pre = nn.Conv1d(in_dim, dim, kernel_size=7, padding=3)
        self.norm_pre = nn.LayerNorm(dim, eps=1e-6)
        layer_scale = 1.0 / config.istft_layers
        self.blocks = nn.ModuleList(
            EchoXConvNeXtBlock(dim, config.istft_intermediate_dim, layer_scale) for _ in range(config.istft_layers)
        )
        self.norm_post = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, self.n_fft + 2)

    def spectrum(self, frames: torch.Tensor, lengths: torch.LongTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """Complex `[B, n_fft // 2 + 1, T × upsample]` spectrum (zero at padding frames) and its frame counts."""
        if self.upsample > 1:
            frames = torch.repeat_interleave(frames, self.upsample, dim=2)
            lengths = lengths * self.upsample
        hidden_states = self.conv_pre(_zero_padding(frames, lengths))
        hidden_states = self.norm_pre(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = _zero_padding(hidden_states, lengths)
        for block in self.blocks:
            hidden_states = block(hidden_states, lengths)
        hidden_states = self.head(self.norm_post(hidden_states.transpose(1, 2))).transpose(1, 2).float()
        log_magnitude, phase = hidden_states.chunk(2, dim=1)
        magnitude = torch.exp(torch.clamp(log_magnitude, max=self.max_log_magnitude))
        spectrum = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        padding = torch.arange(spectrum.shape[-1], device=spectrum.device) >= lengths[:, None]
        return spectrum.masked_fill(padding[:, None, :], 0), lengths

    def forward(self, frames: torch.Tensor, lengths: torch.LongTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        spectrum, frame_lengths = self.spectrum(frames, lengths)
        sample_lengths = frame_lengths * self.hop
        # built here, not kept as a buffer: from_pretrained leaves non-persistent buffers uninitialized
        window = torch.hann_window(self.n_fft, dtype=spectrum.real.dtype, device=spectrum.device)
        waveforms = [
            torch.istft(
                spectrum[row, :, :count],
                self.n_fft,
                hop_length=self.hop,
                win_length=self.n_fft,
                window=window,
                center=True,
                length=samples,
            )
            for row, (count, samples) in enumerate(zip(frame_lengths.tolist(), sample_lengths.tolist()))
        ]
        waveform = nn.utils.rnn.pad_sequence(waveforms, batch_first=True)
        return torch.clamp(waveform, -1.0, 1.0), sample_lengths


__all__ = ["EchoXConvNeXtBlock", "EchoXIstftGenerator"]
