"""HiFi-GAN discriminators (Kong et al. 2020, as used by fairseq / speech-resynthesis CodeHiFiGAN training):
the multi-period discriminator (periods 2, 3, 5, 7, 11) and the multi-scale discriminator (raw, ×2 and ×4 average
pooled waveform). Channel widths are configurable so that a small CPU variant exists; the defaults are the
published sizes.
"""

import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

LRELU_SLOPE = 0.1

# published sizes
MPD_CHANNELS = (32, 128, 512, 1024, 1024)
MSD_CHANNELS = (128, 128, 256, 512, 1024, 1024, 1024)
MSD_GROUPS = (1, 4, 16, 16, 16, 16, 1)
MSD_KERNELS = (15, 41, 41, 41, 41, 41, 5)
MSD_STRIDES = (1, 2, 2, 4, 4, 1, 1)


@dataclass
class DiscriminatorConfig:
    """
    Sizes of [`HifiGanDiscriminator`].

    Args:
        periods: periods of the multi-period discriminator's sub-discriminators.
        mpd_channels: output channels of each 2-D convolution of a period discriminator; all but the last use stride
            `mpd_stride` (published: 32, 128, 512, 1024, 1024).
        mpd_kernel_size / mpd_stride: kernel and stride along time of the period discriminator's convolutions.
        msd_scales: number of scale discriminators (raw waveform, then each further one on a ×2 average-pooled input).
        msd_channels: output channels of the 7 convolutions of a scale discriminator (published: 128, 128, 256, 512,
            1024, 1024, 1024). Group counts (1, 4, 16, 16, 16, 16, 1) are reduced to divide narrower widths.
    """

    periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    mpd_channels: list[int] = field(default_factory=lambda: list(MPD_CHANNELS))
    mpd_kernel_size: int = 5
    mpd_stride: int = 3
    msd_scales: int = 3
    msd_channels: list[int] = field(default_factory=lambda: list(MSD_CHANNELS))

    @classmethod
    def from_dict(cls, values: dict | None) -> "DiscriminatorConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown discriminator config fields: {sorted(unknown)} (known: {sorted(known)}).")
        config = cls(**values)
        if len(config.msd_channels) != len(MSD_CHANNELS):
            raise ValueError(f"msd_channels needs {len(MSD_CHANNELS)} widths, got {config.msd_channels}.")
        if not config.mpd_channels or not config.periods:
            raise ValueError("mpd_channels and periods must not be empty.")
        return config

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class PeriodDiscriminator(nn.Module):
    """Looks at the waveform folded into `[T / period, period]`: 2-D convolutions along time, one column per phase."""

    def __init__(self, period: int, channels=MPD_CHANNELS, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        padding = (kernel_size - 1) // 2
        convs, in_channels = [], 1
        for i, out_channels in enumerate(channels):
            layer_stride = stride if i < len(channels) - 1 else 1
            conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), (layer_stride, 1), padding=(padding, 0))
            convs.append(weight_norm(conv))
            in_channels = out_channels
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(in_channels, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`[B, 1, S]` → logits `[B, N]` and the feature maps of every layer."""
        batch, channels, length = waveform.shape
        if length % self.period:
            pad = self.period - length % self.period
            mode = "reflect" if pad < length else "constant"
            waveform = nn.functional.pad(waveform, (0, pad), mode)
            length += pad
        hidden = waveform.view(batch, channels, length // self.period, self.period)
        feature_maps = []
        for conv in self.convs:
            hidden = nn.functional.leaky_relu(conv(hidden), LRELU_SLOPE)
            feature_maps.append(hidden)
        hidden = self.conv_post(hidden)
        feature_maps.append(hidden)
        return hidden.flatten(1), feature_maps


class ScaleDiscriminator(nn.Module):
    """1-D strided, grouped convolutions over the waveform (at one scale)."""

    def __init__(self, channels=MSD_CHANNELS, use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        convs, in_channels = [], 1
        for out_channels, groups, kernel, stride in zip(channels, MSD_GROUPS, MSD_KERNELS, MSD_STRIDES):
            groups = math.gcd(math.gcd(groups, in_channels), out_channels)
            conv = nn.Conv1d(in_channels, out_channels, kernel, stride, groups=groups, padding=(kernel - 1) // 2)
            convs.append(norm(conv))
            in_channels = out_channels
        self.convs = nn.ModuleList(convs)
        self.conv_post = norm(nn.Conv1d(in_channels, 1, 3, 1, padding=1))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden, feature_maps = waveform, []
        for conv in self.convs:
            hidden = nn.functional.leaky_relu(conv(hidden), LRELU_SLOPE)
            feature_maps.append(hidden)
        hidden = self.conv_post(hidden)
        feature_maps.append(hidden)
        return hidden.flatten(1), feature_maps


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods=(2, 3, 5, 7, 11), channels=MPD_CHANNELS, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.discriminators = nn.ModuleList(
            PeriodDiscriminator(period, channels, kernel_size, stride) for period in periods
        )

    def forward(self, waveform: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """`[B, S]` or `[B, 1, S]` → one logits tensor and one feature-map list per sub-discriminator."""
        if waveform.dim() == 2:
            waveform = waveform[:, None]
        outputs = [discriminator(waveform) for discriminator in self.discriminators]
        return [logits for logits, _ in outputs], [maps for _, maps in outputs]


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, scales: int = 3, channels=MSD_CHANNELS):
        super().__init__()
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(channels, use_spectral_norm=(i == 0)) for i in range(scales)
        )
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, waveform: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        if waveform.dim() == 2:
            waveform = waveform[:, None]
        all_logits, all_maps = [], []
        for i, discriminator in enumerate(self.discriminators):
            if i > 0:
                waveform = self.pool(waveform)
            logits, maps = discriminator(waveform)
            all_logits.append(logits)
            all_maps.append(maps)
        return all_logits, all_maps


class HifiGanDiscriminator(nn.Module):
    """
    Multi-period + multi-scale discriminator. `forward(real, fake)` runs both waveforms `[B, S]` in one batched pass
    (one forward call, so it works under DistributedDataParallel) and returns
    `(real_logits, fake_logits, real_feature_maps, fake_feature_maps)`, lists over the sub-discriminators.
    """

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        config = config or DiscriminatorConfig()
        self.config = config
        self.mpd = MultiPeriodDiscriminator(
            config.periods, config.mpd_channels, config.mpd_kernel_size, config.mpd_stride
        )
        self.msd = MultiScaleDiscriminator(config.msd_scales, config.msd_channels)

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        if real.shape != fake.shape:
            raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} waveforms must match.")
        batch = real.shape[0]
        both = torch.cat([real, fake], dim=0)
        logits, maps = [], []
        for discriminator in (self.mpd, self.msd):
            sub_logits, sub_maps = discriminator(both)
            logits += sub_logits
            maps += sub_maps
        real_logits = [x[:batch] for x in logits]
        fake_logits = [x[batch:] for x in logits]
        real_maps = [[x[:batch] for x in layer_maps] for layer_maps in maps]
        fake_maps = [[x[batch:] for x in layer_maps] for layer_maps in maps]
        return real_logits, fake_logits, real_maps, fake_maps


__all__ = [
    "DiscriminatorConfig",
    "HifiGanDiscriminator",
    "MultiPeriodDiscriminator",
    "MultiScaleDiscriminator",
    "PeriodDiscriminator",
    "ScaleDiscriminator",
]
