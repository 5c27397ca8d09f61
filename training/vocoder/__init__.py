"""Training recipe of the EchoX unit vocoder (`modeling_echox.model.vocoder.EchoXCodeHifiGan`): HiFi-GAN discriminators,
losses, a unit/duration/waveform-segment dataset, and the entry point `python -m training.train_vocoder`."""

from .data import VocoderCollator, VocoderSegmentDataset, read_manifest
from .discriminators import (
    DiscriminatorConfig,
    HifiGanDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
)
from .losses import (
    LogMelSpectrogram,
    MultiResolutionSTFTLoss,
    discriminator_loss,
    duration_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    mel_l1_loss,
)

__all__ = [
    "DiscriminatorConfig",
    "HifiGanDiscriminator",
    "LogMelSpectrogram",
    "MultiPeriodDiscriminator",
    "MultiResolutionSTFTLoss",
    "MultiScaleDiscriminator",
    "VocoderCollator",
    "VocoderSegmentDataset",
    "discriminator_loss",
    "duration_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "mel_l1_loss",
    "read_manifest",
]
