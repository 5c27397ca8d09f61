"""The vocoder as trained: the generator with its duration predictor in one module, the discriminator, the export."""

import copy
from typing import Any

import torch
from torch import nn

from modeling_echox.model.configuration_echox import EchoXVocoderConfig
from modeling_echox.model.vocoder import EchoXCodeHifiGan

from .discriminators import DiscriminatorConfig, HifiGanDiscriminator


class VocoderForTraining(nn.Module):
    """
    The generator plus its duration predictor in one `forward` (so that DistributedDataParallel sees every parameter
    used): the waveform from the given (teacher-forced) durations and the predicted log-durations of the same units.
    """

    def __init__(self, generator: EchoXCodeHifiGan):
        super().__init__()
        self.generator = generator

    def forward(self, input_ids, attention_mask, durations, speaker_id=None) -> dict[str, torch.Tensor]:
        generator = self.generator
        output = generator(input_ids, attention_mask=attention_mask, durations=durations, speaker_id=speaker_id)
        ids, valid = generator._check_units(input_ids, attention_mask)
        log_durations = generator._log_durations(generator.unit_embedding(ids), valid)
        return {
            "waveform": output.waveform,
            "waveform_lengths": output.waveform_lengths,
            "log_durations": log_durations,
        }


def build_models(config: dict[str, Any]) -> tuple[EchoXCodeHifiGan, HifiGanDiscriminator | None]:
    """The generator (weight-normed if it is a HiFi-GAN) and the discriminator (`None` if `adversarial` is false)."""
    generator = EchoXCodeHifiGan(EchoXVocoderConfig(**config["vocoder"]))
    generator.apply_weight_norm()  # a no-op for the iSTFT generator
    if not config.get("adversarial", True):
        return generator, None
    discriminator = HifiGanDiscriminator(DiscriminatorConfig.from_dict(config["discriminator"]))
    return generator, discriminator


def export_generator(generator: EchoXCodeHifiGan, directory: str):
    """Saves a weight-norm-free copy of a weight-normed generator with `save_pretrained` (the original is untouched)."""
    plain = EchoXCodeHifiGan(copy.deepcopy(generator.config))
    plain.apply_weight_norm()
    plain.load_state_dict(generator.state_dict())
    plain.remove_weight_norm()
    plain.save_pretrained(directory)
