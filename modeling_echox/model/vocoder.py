"""The unit vocoder: fairseq's CodeHiFiGAN (unit embedding → duration predictor → HiFi-GAN), built from transformers'
SeamlessM4T HiFi-GAN blocks; optionally (`generator_type="istft"`) with a light Vocos-style iSTFT generator in place
of the HiFi-GAN."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.seamless_m4t.modeling_seamless_m4t import (
    SeamlessM4THifiGan,
    SeamlessM4TVariancePredictor,
)
from transformers.utils import ModelOutput

from .configuration_echox import EchoXVocoderConfig
from .vocoder_istft import EchoXConvNeXtBlock, EchoXIstftGenerator

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass
class EchoXVocoderOutput(ModelOutput):
    r"""
    waveform (`torch.FloatTensor` of shape `(batch_size, num_samples)`):
        The waveforms in [-1, 1], right-padded with zeros.
    waveform_lengths (`torch.LongTensor` of shape `(batch_size,)`):
        Number of valid samples of each waveform: duration-expanded frames × `config.hop_length` (one sample more
        per upsampling stage whose kernel size minus rate is odd).
    """

    waveform: torch.FloatTensor | None = None
    waveform_lengths: torch.LongTensor | None = None


def _zero_padding(hidden_states: torch.Tensor, lengths: torch.LongTensor) -> torch.Tensor:
    """Zeroes the time steps of `[B, C, T]` states from each sequence's length on."""
    padding = torch.arange(hidden_states.shape[-1], device=hidden_states.device) >= lengths[:, None]
    return hidden_states.masked_fill(padding[:, None, :], 0.0)


class EchoXCodeHifiGan(PreTrainedModel):
    r"""
    fairseq's `CodeGenerator` (the CodeHiFiGAN unit vocoder of EchoX): units are embedded, each unit is repeated by its
    duration (predicted by `dur_predictor`, or given), an optional speaker embedding is appended on the channel axis,
    and the HiFi-GAN generator turns the frames into a waveform at `config.sampling_rate`.

    With `config.generator_type == "istft"` the HiFi-GAN (`hifi_gan`) is replaced by an [`EchoXIstftGenerator`]
    (`istft_generator`); everything else is shared.

    Batches may mix lengths: the padding is zeroed after every convolution, so each sequence gets the waveform it would
    get alone.
    """

    config_class = EchoXVocoderConfig
    main_input_name = "input_ids"
    base_model_prefix = "vocoder"

    def __init__(self, config: EchoXVocoderConfig):
        super().__init__(config)
        self.unit_embedding = nn.Embedding(config.num_units, config.unit_embed_dim)
        self.speaker_embedding = (
            nn.Embedding(config.num_speakers, config.spkr_embed_dim) if config.num_speakers > 0 else None
        )
        self.dur_predictor = SeamlessM4TVariancePredictor(config)
        if config.generator_type == "istft":
            self.istft_generator = EchoXIstftGenerator(config)
        else:
            self.hifi_gan = SeamlessM4THifiGan(config)

        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Embeddings ~ N(0, 1) as in fairseq; convolutions ~ N(0, initializer_range) as in HiFi-GAN; zero biases."""
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, EchoXConvNeXtBlock):
            init.constant_(module.gamma, module.layer_scale_init)
        else:
            super()._init_weights(module)

    def _check_units(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Validates unit ids and returns `[B, T]` ids (0 at padding) and the `[B, T]` boolean mask of valid units."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor of unit ids, got {type(input_ids).__name__}.")
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must have shape [batch, length] or [length], got {tuple(input_ids.shape)}.")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        if input_ids.shape[1] == 0:
            raise ValueError("Empty unit sequence: every sequence needs at least one unit.")
        if input_ids.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"input_ids must be an integer tensor of unit ids, got dtype {input_ids.dtype}.")

        if attention_mask is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                f"{tuple(input_ids.shape)}."
            )
        else:
            valid = attention_mask.bool()
        if not valid.any(dim=1).all():
            raise ValueError("Empty unit sequence: attention_mask leaves a sequence without any unit.")

        units = input_ids[valid]
        if units.min() < 0 or units.max() >= self.config.num_units:
            raise ValueError(
                f"Unit ids must be in [0, {self.config.num_units}), got ids in [{units.min().item()}, "
                f"{units.max().item()}]."
            )
        return input_ids.long().masked_fill(~valid, 0), valid

    def _speaker_embeds(self, speaker_id: int | torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """`[B, spkr_embed_dim]` speaker embeddings, or `None` for a single-speaker vocoder."""
        if self.speaker_embedding is None:
            if speaker_id is not None:
                raise ValueError("speaker_id was given, but this is a single-speaker vocoder (num_speakers=0).")
            return None
        if speaker_id is None:
            raise ValueError(f"This vocoder has {self.config.num_speakers} speakers: pass a speaker_id.")
        speaker_id = torch.as_tensor(speaker_id, device=self.unit_embedding.weight.device)
        if speaker_id.dtype not in _INTEGER_DTYPES or speaker_id.dim() > 1:
            raise ValueError(f"speaker_id must be an integer or a [batch] integer tensor, got {speaker_id!r}.")
        if speaker_id.min() < 0 or speaker_id.max() >= self.config.num_speakers:
            raise ValueError(f"speaker_id must be in [0, {self.config.num_speakers}), got {speaker_id.tolist()}.")
        if speaker_id.numel() not in (1, batch_size):
            raise ValueError(f"Got {speaker_id.numel()} speaker ids for a batch of {batch_size} sequences.")
        return self.speaker_embedding(speaker_id.long().reshape(-1)).expand(batch_size, -1)

    def _log_durations(self, unit_embeds: torch.Tensor, valid: torch.BoolTensor) -> torch.Tensor:
        """`dur_predictor` on `[B, T, C]` embeddings, with the padding zeroed before each convolution."""
        predictor = self.dur_predictor
        padding = ~valid[:, :, None]
        hidden_states = predictor.conv1(unit_embeds.masked_fill(padding, 0.0).transpose(1, 2))
        hidden_states = predictor.activation_function(hidden_states).transpose(1, 2)
        hidden_states = predictor.dropout_module(predictor.ln1(hidden_states)).masked_fill(padding, 0.0)
        hidden_states = predictor.conv2(hidden_states.transpose(1, 2))
        hidden_states = predictor.activation_function(hidden_states).transpose(1, 2)
        hidden_states = predictor.dropout_module(predictor.ln2(hidden_states))
        return predictor.proj(hidden_states).squeeze(2)

    def _durations(self, unit_embeds: torch.Tensor, valid: torch.BoolTensor) -> torch.LongTensor:
        log_durations = self._log_durations(unit_embeds, valid)
        durations = torch.clamp(torch.round(torch.exp(log_durations) - 1).long(), min=1)
        return durations.masked_fill(~valid, 0)

    def predict_durations(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.LongTensor:
        """
        Frames per unit predicted by the duration predictor, fairseq's rule `clamp(round(exp(log_dur) - 1), min=1)`.
        Returns `[B, T]` (a `[T]` input counts as a batch of one), 0 at padded positions.
        """
        input_ids, valid = self._check_units(input_ids, attention_mask)
        return self._durations(self.unit_embedding(input_ids), valid)

    def _check_durations(self, durations: torch.Tensor, valid: torch.BoolTensor) -> torch.LongTensor:
        """Validates given durations (shaped like `input_ids`) and returns them as `[B, T]`, 0 at padding."""
        if not isinstance(durations, torch.Tensor):
            raise ValueError(f"durations must be a torch.Tensor, got {type(durations).__name__}.")
        if durations.dim() == 1:
            durations = durations[None]
        if durations.shape != valid.shape:
            raise ValueError(
                f"durations shape {tuple(durations.shape)} does not match input_ids shape {tuple(valid.shape)}."
            )
        if durations.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"durations must be an integer tensor, got dtype {durations.dtype}.")
        durations = durations.to(valid.device).long().masked_fill(~valid, 0)
        if (durations[valid] < 1).any():
            raise ValueError("durations must be ≥ 1 for every unit.")
        return durations

    def _generate_waveform(
        self, frames: torch.Tensor, lengths: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        `SeamlessM4THifiGan.forward` on `[B, C, T]` frames, zeroing the padding after every convolution so that each
        sequence sees the zero padding it would see alone. Returns the `[B, S]` waveforms and their lengths.
        (The iSTFT generator handles its padding itself.)
        """
        if self.config.generator_type == "istft":
            return self.istft_generator(frames, lengths)
        hifi_gan = self.hifi_gan
        slope = hifi_gan.leaky_relu_slope
        hidden_states = _zero_padding(hifi_gan.conv_pre(_zero_padding(frames, lengths)), lengths)
        for i, upsampler in enumerate(hifi_gan.upsampler):
            hidden_states = upsampler(nn.functional.leaky_relu(hidden_states, slope))
            stride, padding = upsampler.stride[0], upsampler.padding[0]
            lengths = (lengths - 1) * stride - 2 * padding + upsampler.kernel_size[0]
            hidden_states = _zero_padding(hidden_states, lengths)

            res_state = 0
            for resblock in hifi_gan.resblocks[i * hifi_gan.num_kernels : (i + 1) * hifi_gan.num_kernels]:
                block_state = hidden_states
                for conv1, conv2 in zip(resblock.convs1, resblock.convs2):
                    residual = nn.functional.leaky_relu(block_state, slope)
                    residual = _zero_padding(conv1(residual), lengths)
                    residual = nn.functional.leaky_relu(residual, slope)
                    block_state = _zero_padding(conv2(residual), lengths) + block_state
                res_state = res_state + block_state
            hidden_states = res_state / hifi_gan.num_kernels

        hidden_states = hifi_gan.conv_post(nn.functional.leaky_relu(hidden_states))
        waveform = _zero_padding(torch.tanh(hidden_states), lengths).squeeze(1)
        return waveform, lengths

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        durations: torch.LongTensor | None = None,
        speaker_id: int | torch.LongTensor | None = None,
    ) -> EchoXVocoderOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, length)` or `(length,)`):
                Deduplicated unit ids in `[0, config.num_units)`.
            attention_mask (`torch.Tensor` of the same shape, *optional*):
                1 for units, 0 for padding.
            durations (`torch.LongTensor` of the same shape, *optional*):
                Frames per unit (≥ 1 at units; ignored at padding), e.g. for teacher forcing. Predicted if not given.
            speaker_id (`int` or `torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Speaker of a multi-speaker vocoder; must be `None` for a single-speaker one.

        Returns:
            [`EchoXVocoderOutput`]: `[B, S]` float32 waveforms (a `[T]` input counts as a batch of one) and their
            lengths.
        """
        input_ids, valid = self._check_units(input_ids, attention_mask)
        unit_embeds = self.unit_embedding(input_ids)
        speaker_embeds = self._speaker_embeds(speaker_id, input_ids.shape[0])
        if durations is None:
            durations = self._durations(unit_embeds, valid)
        else:
            durations = self._check_durations(durations, valid)

        # B x T x C -> frames: each unit repeated by its duration, right-padded per sequence
        frame_lengths = durations.sum(dim=1)
        frames = torch.repeat_interleave(unit_embeds.flatten(0, 1), durations.flatten(), dim=0)
        frames = nn.utils.rnn.pad_sequence(frames.split(frame_lengths.tolist()), batch_first=True)
        if speaker_embeds is not None:
            speaker_frames = speaker_embeds[:, None, :].expand(-1, frames.shape[1], -1)
            frames = torch.cat([frames, speaker_frames], dim=-1)

        waveform, waveform_lengths = self._generate_waveform(frames.transpose(1, 2), frame_lengths)
        return EchoXVocoderOutput(waveform=waveform.float(), waveform_lengths=waveform_lengths)

    @torch.no_grad()
    def synthesize(self, unit_ids: list[int] | torch.LongTensor, speaker_id: int | None = None) -> torch.FloatTensor:
        """Waveform `[S]` of one unit sequence, with predicted durations."""
        unit_ids = torch.as_tensor(unit_ids, device=self.unit_embedding.weight.device)
        if unit_ids.dim() != 1:
            raise ValueError(f"synthesize takes one unit sequence ([length]), got shape {tuple(unit_ids.shape)}.")
        output = self(unit_ids, speaker_id=speaker_id)
        return output.waveform[0, : output.waveform_lengths[0]]

    def _weight_norm_layers(self):
        hifi_gan = self.hifi_gan
        yield hifi_gan.conv_pre
        yield from hifi_gan.upsampler
        for resblock in hifi_gan.resblocks:
            yield from resblock.convs1
            yield from resblock.convs2
        yield hifi_gan.conv_post

    def apply_weight_norm(self):
        """Re-parametrizes every HiFi-GAN convolution with weight norm (`dim=0`, as fairseq trains it). A no-op for
        the iSTFT generator (it has no weight norm: LayerNorms instead)."""
        if self.config.generator_type == "istft":
            return
        for layer in self._weight_norm_layers():
            nn.utils.parametrizations.weight_norm(layer)

    def remove_weight_norm(self):
        """Folds the weight norm back into plain weights (do this before `save_pretrained`). A no-op for the iSTFT
        generator."""
        if self.config.generator_type == "istft":
            return
        for layer in self._weight_norm_layers():
            nn.utils.parametrize.remove_parametrizations(layer, "weight")


__all__ = ["EchoXCodeHifiGan", "EchoXVocoderOutput"]
