"""EchoX: a speech-to-speech LLM with an echo decoder (arXiv 2509.09174), as a transformers model."""

from collections.abc import Iterator
from dataclasses import dataclass
from threading import Thread

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import ModelOutput

from .configuration_echox import EchoXConfig
from .echo_decoder import EchoXEchoDecoder
from .generation_configuration_echox import EchoXGenerationConfig
from .prompt_cache import PromptPrefixCache
from .speech_adapter import EchoXSpeechAdapter
from .streaming import EchoXAudioStreamer, EchoXStreamChunk
from .vocoder import EchoXCodeHifiGan
from .voicing import EchoXVoicer

IGNORE_INDEX = -100
AUDIO_CROP_MARGIN = 4  # encoder frames kept after a clip's real audio when `crop_audio_padding` is on


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
    """

    sequences: torch.LongTensor | None = None
    text: list[str] | None = None
    segments: list[list[tuple[int, int]]] | None = None
    segment_unit_ids: list[list[list[int]]] | None = None
    unit_ids: list[list[int]] | None = None
    waveforms: list[torch.FloatTensor] | None = None
    sampling_rate: int | None = None


@dataclass
class _PromptInputs:
    inputs_embeds: torch.Tensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    labels: torch.LongTensor | None
    ctc_logits: torch.Tensor | None
    ctc_lengths: torch.LongTensor | None = None


class EchoXPreTrainedModel(PreTrainedModel):
    config: EchoXConfig
    generation_config_class = EchoXGenerationConfig
    base_model_prefix = ""
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["EchoXSpeechAdapter"]  # the sub-models add their own layers in post_init
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EchoXForSpeechToSpeech):
            module.unit_table.fill_(-1)


class EchoXForSpeechToSpeech(EchoXPreTrainedModel, GenerationMixin):
    """
    The whole EchoX: `audio_tower` (Whisper encoder) → `speech_adapter` → `language_model` (any causal LM) →
    `echo_decoder` → `vocoder` (unit HiFi-GAN). `unit_table` maps each unit-language token to its acoustic unit ids.
    """

    output_modalities = ("text", "audio")
    accepts_loss_kwargs = False

    def __init__(self, config: EchoXConfig):
        super().__init__(config)
        self.audio_tower = WhisperEncoder(config.audio_config)
        self.speech_adapter = EchoXSpeechAdapter(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.echo_decoder = EchoXEchoDecoder(config)
        self.vocoder = EchoXCodeHifiGan(config.vocoder_config)
        self.prompt_prefix_cache = PromptPrefixCache()
        self.register_buffer(
            "unit_table", torch.full((config.unit_vocab_size, config.unit_max_piece_length), -1, dtype=torch.long)
        )
        self.post_init()
        # The speech encoder is frozen, as in the paper; `audio_tower.requires_grad_(True)` makes it trainable.
        self.audio_tower.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, with the speech encoder frozen again (loading re-creates parameters); a
        checkpoint with a NaN or infinite weight is refused (`check_finite_weights`).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model.audio_tower.requires_grad_(False)
        model.check_finite_weights(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return loaded

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        """
        `GenerationMixin.adjust_generation_fn` (reads the checkpoint's `generation_config.json`), with the result as an
        [`EchoXGenerationConfig`]: the EchoX fields the file lacks come from the generation config made from the model
        config (a checkpoint of the first layout held them in its `config.json`), else take their defaults.
        """
        from_model_config = self.generation_config
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        self.generation_config = EchoXGenerationConfig.from_generation_config(self.generation_config, from_model_config)

    def check_finite_weights(self, source) -> None:
        """
        Raise `ValueError` naming `source` (the checkpoint) and the first weight (parameter or persistent buffer) that
        holds NaN or infinite values: such a model would answer with empty text and silence. One pass per
        floating-point tensor (tied weights once): NaN and infinities propagate into its sum, and only a sum that is
        not finite (a poisoned tensor, or an overflow) is checked element by element. Tensors not materialized (on the
        meta device) are skipped.
        """
        seen = set()
        for name, tensor in self.state_dict().items():
            if not tensor.is_floating_point() or tensor.is_meta or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            if torch.isfinite(tensor.sum()):
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(
                    f"The EchoX checkpoint {source} is damaged: its weight {name} holds {bad} NaN or infinite "
                    f"value(s) (of {tensor.numel()})."
                )

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; refused for a model quantized with `quantize_int8` (inference only)."""
        if getattr(self, "is_int8_quantized", False):
            raise ValueError("This EchoX model was quantized to int8 for inference and cannot be saved; save it before quantizing.")
        return super().save_pretrained(*args, **kwargs)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    @property
    def text_table(self) -> torch.Tensor:
        """The LLM output-embedding table `[V, H]`: the echo decoder's (frozen) text embeddings."""
        return self.language_model.get_output_embeddings().weight

    # ----------------------------------------------------------------------------------------------------- speech in
    def get_speech_embeddings(
        self,
        input_features: torch.FloatTensor | None = None,
        encoder_states: torch.FloatTensor | None = None,
        audio_frame_lengths: torch.LongTensor | None = None,
        return_ctc_logits: bool = True,
    ):
        """
        Log-mel features `[N, n_mels, frames]` → `SpeechAdapterOutput` (speech embeddings per clip, CTC logits unless
        `return_ctc_logits=False`).
        `encoder_states` `[N, frames / 2, d_model]`: the frozen `audio_tower`'s outputs computed beforehand (e.g. a
        training feature cache, see `encode_audio`); they replace `input_features` and skip the speech encoder.
        With `crop_audio_padding`, each clip's adapter sees only its real encoder frames (+ a margin):
        `audio_frame_lengths` `[N]` says how many (default: read off `input_features`, or all frames).
        """
        if encoder_states is not None:
            expected = (self.audio_tower.config.max_source_positions, self.config.audio_config.d_model)
            if encoder_states.dim() != 3 or tuple(encoder_states.shape[1:]) != expected:
                raise ValueError(
                    f"encoder_states must have shape [clips, {expected[0]}, {expected[1]}] (the speech encoder's "
                    f"output frames and width), got {list(encoder_states.shape)}."
                )
            states = encoder_states
        else:
            if self.config.crop_audio_padding and audio_frame_lengths is None:
                audio_frame_lengths = self.real_frame_lengths(input_features)
            states = self.encode_audio(input_features, audio_frame_lengths)
        frame_counts = None
        if self.config.crop_audio_padding and audio_frame_lengths is not None:
            frame_counts = [self.cropped_frames(length) for length in audio_frame_lengths.tolist()]
        return self.speech_adapter(states.to(self.speech_adapter.projector.weight.dtype), frame_counts, return_ctc_logits)

    @staticmethod
    def real_frame_lengths(input_features: torch.FloatTensor) -> torch.LongTensor:
        """
        Encoder frames holding real audio, per clip, read off Whisper log-mel features: the feature extractor pads
        with zeros, whose log-mel sits exactly on the clip's floor value, so the last frame with any bin above the
        floor ends the audio (each encoder frame covers 2 mel frames).
        """
        floor = input_features.amin(dim=(1, 2), keepdim=True)
        active = (input_features > floor + 1e-4).any(dim=1)
        index = torch.arange(active.shape[1], device=active.device)
        last = torch.where(active, index, -1).amax(dim=1)
        return (last + 2) // 2

    def cropped_frames(self, frame_length: int) -> int:
        """Encoder frames `crop_audio_padding` keeps of a clip with `frame_length` real frames (margin, frame stack)."""
        stack = self.config.adapter_frame_stack
        kept = -(-(int(frame_length) + AUDIO_CROP_MARGIN) // stack) * stack
        return min(kept, self.audio_tower.config.max_source_positions)

    def encode_audio(
        self, input_features: torch.FloatTensor, audio_frame_lengths: torch.LongTensor | None = None
    ) -> torch.FloatTensor:
        """
        The speech encoder alone: log-mel features `[N, n_mels, frames]` → states `[N, frames / 2, d_model]`.
        With `encoder_window="clip"` each clip is encoded over its `cropped_frames` only (`audio_frame_lengths` real
        frames per clip, default: read off the features) and the states after them are zero.
        """
        expected = (self.config.audio_config.num_mel_bins, self.audio_tower.config.max_source_positions * 2)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"input_features must have shape [clips, {expected[0]}, {expected[1]}] (log-mel bins, frames of the "
                f"speech encoder's window), got {list(input_features.shape)}."
            )
        if not torch.isfinite(input_features).all():
            raise ValueError("input_features contain NaN or infinite values.")
        tower_trains = any(parameter.requires_grad for parameter in self.audio_tower.parameters())
        features = input_features.to(self.audio_tower.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            if self.config.encoder_window == "full":
                return self.audio_tower(features).last_hidden_state
            if audio_frame_lengths is None:
                audio_frame_lengths = self.real_frame_lengths(input_features)
            states = features.new_zeros(features.shape[0], expected[1] // 2, self.config.audio_config.d_model)
            for clip, length in enumerate(audio_frame_lengths.tolist()):
                frames = self.cropped_frames(length)
                states[clip, :frames] = self._encode_window_prefix(features[clip : clip + 1, :, : 2 * frames])[0]
            return states

    def _encode_window_prefix(self, features: torch.FloatTensor) -> torch.FloatTensor:
        """`WhisperEncoder`'s forward on fewer mel frames than its window (its own layers, the first positions)."""
        tower = self.audio_tower
        hidden = nn.functional.gelu(tower.conv1(features))
        hidden = nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + tower.embed_positions.weight[: hidden.shape[1]]
        hidden = nn.functional.dropout(hidden, p=tower.dropout, training=tower.training)
        for layer in tower.layers:
            hidden = layer(hidden, None)
        return tower.layer_norm(hidden)

    def _prepare_prompt(
        self,
        input_ids,
        attention_mask,
        input_features=None,
        labels=None,
        padding_side="right",
        encoder_states=None,
        audio_frame_lengths=None,
        return_ctc_logits=True,
    ):
        """
        Embed `input_ids`, replace each `<audio>` placeholder by its clip's speech embeddings (clips in row-major
        order), re-pad the batch on `padding_side`, and build the attention mask (padding, plus every eot when
        `mask_eot_in_prompt`) and position ids (contiguous over non-padding tokens, masked eots included).
        `return_ctc_logits=False` when only the speech embeddings are needed (generation).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        placeholders = input_ids == self.config.audio_token_id
        if input_features is not None and encoder_states is not None:
            raise ValueError("Pass either input_features or encoder_states, not both.")
        audio = input_features if input_features is not None else encoder_states
        num_clips = 0 if audio is None else audio.shape[0]
        if int(placeholders.sum()) != num_clips:
            raise ValueError(
                f"The prompt holds {int(placeholders.sum())} audio placeholder token(s) (id {self.config.audio_token_id}) "
                f"but {num_clips} audio clip(s) were given; each clip needs exactly one placeholder."
            )
        speech = (
            self.get_speech_embeddings(input_features, encoder_states, audio_frame_lengths, return_ctc_logits)
            if num_clips
            else None
        )
        clips = iter(speech.speech_embeddings) if speech is not None else iter(())
        embed = self.get_input_embeddings()
        pad_id = self.config.text_pad_token_id if self.config.text_pad_token_id is not None else 0

        rows_ids, rows_embeds, rows_labels = [], [], []
        for row in range(input_ids.shape[0]):
            keep = attention_mask[row].bool()
            ids = input_ids[row][keep]
            row_labels = labels[row][keep] if labels is not None else None
            pieces_ids, pieces_embeds, pieces_labels, start = [], [], [], 0
            for position in torch.nonzero(ids == self.config.audio_token_id).flatten().tolist():
                clip = next(clips)
                pieces_ids += [ids[start:position], ids.new_full((clip.shape[0],), self.config.audio_token_id)]
                pieces_embeds += [embed(ids[start:position]), clip.to(embed.weight.dtype)]
                if row_labels is not None:
                    pieces_labels += [row_labels[start:position], row_labels.new_full((clip.shape[0],), IGNORE_INDEX)]
                start = position + 1
            pieces_ids.append(ids[start:])
            pieces_embeds.append(embed(ids[start:]))
            rows_ids.append(torch.cat(pieces_ids))
            rows_embeds.append(torch.cat(pieces_embeds))
            if row_labels is not None:
                pieces_labels.append(row_labels[start:])
                rows_labels.append(torch.cat(pieces_labels))

        lengths = [row.shape[0] for row in rows_ids]
        ids = pad_sequence(rows_ids, batch_first=True, padding_value=pad_id, padding_side=padding_side)
        inputs_embeds = pad_sequence(rows_embeds, batch_first=True, padding_side=padding_side)
        not_padding = pad_sequence(
            [torch.ones(n, dtype=torch.long, device=ids.device) for n in lengths],
            batch_first=True,
            padding_side=padding_side,
        )
        position_ids = (not_padding.cumsum(-1) - 1).clamp(min=0)
        mask = not_padding
        if self.config.mask_eot_in_prompt and self.config.text_pad_token_id is not None:
            mask = mask * (ids != self.config.text_pad_token_id).long()
        new_labels = None
        if labels is not None:
            new_labels = pad_sequence(rows_labels, batch_first=True, padding_value=IGNORE_INDEX, padding_side=padding_side)
        return _PromptInputs(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            labels=new_labels,
            ctc_logits=speech.ctc_logits if speech is not None else None,
            ctc_lengths=speech.ctc_lengths if speech is not None else None,
        )

    # ------------------------------------------------------------------------------------------------------- losses
    def _ctc_loss(self, ctc_logits, ctc_labels, ctc_lengths=None):
        """CTC of the adapter's head against transcript ids (`-100` padded); blank = `<audio>`, as released."""
        if ctc_labels.shape[0] != ctc_logits.shape[0]:
            raise ValueError(f"ctc_labels has {ctc_labels.shape[0]} rows but the batch has {ctc_logits.shape[0]} audio clips.")
        valid = ctc_labels != IGNORE_INDEX
        log_probs = nn.functional.log_softmax(ctc_logits.float(), dim=-1).transpose(0, 1)
        input_lengths = (
            ctc_lengths.to(torch.long).cpu()
            if ctc_lengths is not None
            else torch.full((ctc_logits.shape[0],), ctc_logits.shape[1], dtype=torch.long)
        )
        return nn.functional.ctc_loss(
            log_probs,
            ctc_labels.masked_fill(~valid, 0),
            input_lengths,
            valid.sum(-1),
            blank=self.config.audio_token_id,
            reduction="mean",
            zero_infinity=True,
        )

    def _echo_loss(self, segments, unit_labels, quirk_flags, token_ids):
        """
        Teacher-forced echo-decoder CE (the CTC decoder: its CTC loss). `segments`: LLM-space vectors `[n_i, H]` of
        each segment; `unit_labels`: its target ids (joint vocabulary, ending with the echo eos); `token_ids`: the
        text ids of its positions.
        """
        if self.echo_decoder.reads_once:
            return self.echo_decoder.ctc_loss(segments, unit_labels, token_ids)
        table = self.text_table
        rows, targets = [], []
        for segment, target, with_quirk, ids in zip(segments, unit_labels, quirk_flags, token_ids, strict=True):
            prompt = self.echo_decoder.segment_embeddings(segment, table, with_quirk_id=with_quirk, token_ids=ids)
            rows.append(torch.cat([prompt, self.echo_decoder.embed_ids(target[:-1], table)]))
            targets.append(torch.cat([target.new_full((prompt.shape[0] - 1,), IGNORE_INDEX), target]))
        inputs = pad_sequence(rows, batch_first=True)
        labels = pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX)
        mask = pad_sequence([torch.ones(row.shape[0], dtype=torch.long, device=inputs.device) for row in rows], batch_first=True)
        logits, _ = self.echo_decoder(inputs, attention_mask=mask)
        labels = self.echo_decoder.logit_index_from_ids(labels, IGNORE_INDEX)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    @staticmethod
    def _split_segments(lengths_row, total):
        """Token spans from one row of `echo_segment_lengths` (0 = no segment)."""
        spans, start = [], 0
        for length in lengths_row.tolist():
            if length <= 0:
                continue
            if start + length > total:
                raise ValueError(f"echo_segment_lengths add up to more than the {total} response tokens of the sample.")
            spans.append((start, start + length))
            start += length
        return spans

    def _text_to_codec_segments(self, echo_text_ids, unit_labels):
        """Stage II: segments are the text-table embeddings of gold text; `echo_text_ids` `[B, S, Lt]`, -100 padded."""
        table = self.text_table.detach()
        segments, labels, quirks, token_ids = [], [], [], []
        for sample_text, sample_units in zip(echo_text_ids, unit_labels):
            for index, (text, units) in enumerate(zip(sample_text, sample_units)):
                text = text[text != IGNORE_INDEX]
                if text.numel() == 0:
                    continue
                segments.append(nn.functional.embedding(text, table))
                labels.append(units[units != IGNORE_INDEX])
                quirks.append(index > 0)
                token_ids.append(text)
        return segments, labels, quirks, token_ids

    def _echo_segments(self, hidden_states, labels, unit_labels, echo_segment_lengths):
        """
        Stage III: the denoised LLM hidden states that produced each response token, cut into segments, and the
        denoising loss (1 - cos to the text-table row of the gold token, summed over tokens, averaged over samples).
        Also returns each segment's token ids.
        """
        table = self.text_table.detach()
        producing = labels[:, 1:] != IGNORE_INDEX
        segments, targets, quirks, token_ids, denoise = [], [], [], [], []
        for row in range(labels.shape[0]):
            states = hidden_states[row, :-1][producing[row]]
            gold = labels[row, 1:][producing[row]]
            if echo_segment_lengths is None:
                spans = [(0, states.shape[0] - 1)]  # the whole response but its final eot, like inference
            else:
                spans = self._split_segments(echo_segment_lengths[row], states.shape[0])
            denoised = self.echo_decoder.denoiser(states)
            used = max(end for _, end in spans)
            cosine = nn.functional.cosine_similarity(denoised[:used].float(), table[gold[:used]].float(), dim=-1)
            denoise.append((1 - cosine).sum())
            for index, (start, end) in enumerate(spans):
                units = unit_labels[row, index]
                segments.append(denoised[start:end])
                targets.append(units[units != IGNORE_INDEX])
                quirks.append(index > 0)
                token_ids.append(gold[start:end])
        return segments, targets, quirks, token_ids, torch.stack(denoise).mean()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        ctc_labels: torch.LongTensor | None = None,
        unit_labels: torch.LongTensor | None = None,
        echo_text_ids: torch.LongTensor | None = None,
        echo_segment_lengths: torch.LongTensor | None = None,
        encoder_states: torch.FloatTensor | None = None,
        audio_frame_lengths: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        hidden_states_callback=None,
        **kwargs,
    ) -> EchoXOutput:
        r"""
        input_features: log-mel features `[clips, n_mels, frames]`, one clip per `<audio>` placeholder in `input_ids`.
        labels: LLM targets aligned with `input_ids` (-100 outside the response); stage I CE.
        ctc_labels: transcript ids per clip `[clips, Lt]` (-100 padded); stage I CTC.
        unit_labels: echo-decoder targets `[B, S, Lu]` per segment (joint-vocabulary ids ending with the echo eos,
            -100 padded). With `echo_text_ids` `[B, S, Lt]` (gold text per segment): stage II (text-to-codec). With
            `labels`: stage III (echo training) on the LLM's hidden states; `echo_segment_lengths` `[B, S]` gives the
            response tokens per segment (the released segment-wise mode: echo loss only), without it the whole
            response is one segment and the loss follows the paper's combination with the S2T loss.
        encoder_states: the frozen speech encoder's outputs `[clips, frames, d_model]` (from `encode_audio`, e.g. a
            feature cache), instead of `input_features`.
        audio_frame_lengths: real encoder frames per clip `[clips]` for `crop_audio_padding` (read off
            `input_features` when not given).
        hidden_states_callback: called with the final-layer state `[B, H]` at the last position (the state that
            produces the next token); streaming uses it.
        """
        if echo_text_ids is not None:
            if unit_labels is None:
                raise ValueError("echo_text_ids (text-to-codec training) needs unit_labels.")
            segments, targets, quirks, token_ids = self._text_to_codec_segments(echo_text_ids, unit_labels)
            echo_loss = self._echo_loss(segments, targets, quirks, token_ids)
            return EchoXOutput(loss=echo_loss, echo_loss=echo_loss)

        prompt = None
        if input_features is not None or encoder_states is not None or (inputs_embeds is None and position_ids is None):
            if input_ids is None:
                raise ValueError("EchoX needs input_ids (or inputs_embeds with position_ids).")
            prompt = self._prepare_prompt(
                input_ids, attention_mask, input_features, labels, encoder_states=encoder_states,
                audio_frame_lengths=audio_frame_lengths,
            )
            inputs_embeds, attention_mask, position_ids, labels = (
                prompt.inputs_embeds,
                prompt.attention_mask,
                prompt.position_ids,
                prompt.labels,
            )
        elif inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        need_hidden = unit_labels is not None or hidden_states_callback is not None
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states) or need_hidden,
            output_attentions=output_attentions,
            logits_to_keep=logits_to_keep,
        )
        logits = outputs.logits
        ctc_logits = prompt.ctc_logits if prompt is not None else None
        if hidden_states_callback is not None:
            hidden_states_callback(outputs.hidden_states[-1][:, -1])

        lm_loss = ctc_loss = echo_loss = denoise_loss = loss = None
        if labels is not None:
            lm_loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
            loss = lm_loss
        if ctc_labels is not None:
            if ctc_logits is None:
                raise ValueError("ctc_labels were given without input_features.")
            ctc_loss = self._ctc_loss(ctc_logits, ctc_labels, prompt.ctc_lengths)
            loss = ctc_loss * self.config.ctc_loss_weight if loss is None else loss + self.config.ctc_loss_weight * ctc_loss
        if unit_labels is not None:
            if labels is None:
                raise ValueError("unit_labels need labels (echo training) or echo_text_ids (text-to-codec training).")
            segments, targets, quirks, token_ids, denoise_loss = self._echo_segments(
                outputs.hidden_states[-1], labels, unit_labels, echo_segment_lengths
            )
            echo_loss = self._echo_loss(segments, targets, quirks, token_ids)
            cap = self.config.denoise_loss_cap * echo_loss.detach()
            weight = cap / denoise_loss.detach() if denoise_loss.detach() > cap else 1.0
            echo_total = echo_loss + weight * denoise_loss
            if echo_segment_lengths is not None:
                loss = echo_total
            elif loss.detach() < 1.0:
                loss = 0.2 * loss + 2.0 * echo_total
            else:
                loss = loss + echo_total

        return EchoXOutput(
            loss=loss,
            lm_loss=lm_loss,
            ctc_loss=ctc_loss,
            echo_loss=echo_loss,
            denoise_loss=denoise_loss,
            logits=logits,
            ctc_logits=ctc_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )

    # --------------------------------------------------------------------------------------------------- generation
    def units_from_echo_ids(self, echo_ids: list[int]) -> list[int]:
        """Acoustic unit ids of generated echo-decoder ids: unit tokens' pieces in order; text ids and units ≥ K dropped."""
        offset = self.config.unit_token_offset
        rows = [i - offset for i in echo_ids if offset <= i < offset + self.config.unit_vocab_size]
        if not rows:
            return []
        units = self.unit_table[torch.tensor(rows, device=self.unit_table.device)].flatten()
        return units[units >= 0].tolist()

    def speak_units(
        self,
        hidden_states: list[torch.Tensor],
        token_ids: list[torch.LongTensor] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[list[int]]:
        """
        Echo decoder for a list of text segments (their LLM hidden states `[n_i, H]` and, for a spelling decoder,
        their token ids `[n_i]`): the unit ids of each (at most `max_new_tokens` echo-decoder tokens per segment).
        """
        echo_ids = self.echo_decoder.generate(
            hidden_states, self.text_table, max_new_tokens=max_new_tokens, token_ids=token_ids
        )
        return [self.units_from_echo_ids(ids) for ids in echo_ids]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        generation_config=None,
        return_audio: bool = True,
        tokenizer=None,
        segmentation_mode: str | None = None,
        streamer=None,
        reuse_prompt_prefix: bool = True,
        **kwargs,
    ) -> EchoXGenerationOutput:
        """
        Answer a batch of prompts (speech or text-only; different lengths) in text and, with `return_audio`, speech.
        Text decoding is transformers' `generate` (greedy or sampling per `generation_config` / kwargs). The answer is
        spoken by an [`EchoXVoicer`]: cut into segments by the generation config's segmentation rule
        (`segmentation_mode`: "faithful", the released one, or "fast"; `None`: the generation config's), each segment
        spoken by the echo decoder, and the vocoder voicing the segments one after another. EchoX's generation fields
        (`EchoXGenerationConfig`) can be passed as kwargs like transformers' own.

        `streamer`: a text streamer (e.g. `TextIteratorStreamer`), or an [`EchoXAudioStreamer`] that receives the
        spoken segments while the text is being generated (batch size 1; the returned output then holds text only).
        `reuse_prompt_prefix`: for a single request, start from the kept key/value cache of the text in front of the
        speech (system prompt, template head; see `PromptPrefixCache`) instead of prefilling it again.
        """
        if input_ids is None:
            raise ValueError("EchoX.generate needs input_ids (build them with EchoXProcessor).")
        for key in ("output_hidden_states", "return_dict_in_generate", "inputs_embeds", "position_ids"):
            if key in kwargs:
                raise ValueError(f"EchoX.generate sets {key} itself.")
        if segmentation_mode is not None:
            kwargs["segmentation_mode"] = segmentation_mode
        # A copy: the model's EchoX fields fill those a given config lacks, then the kwargs override.
        generation_config = EchoXGenerationConfig.from_generation_config(
            generation_config if generation_config is not None else self.generation_config, self.generation_config
        )
        model_kwargs = generation_config.update(**kwargs)
        generation_config.return_dict_in_generate = True
        streams_audio = isinstance(streamer, EchoXAudioStreamer)
        if streams_audio and input_ids.shape[0] != 1:
            raise ValueError("An EchoXAudioStreamer streams one request at a time (batch size 1).")
        if return_audio and (generation_config.num_beams or 1) > 1:
            raise ValueError("Speech output needs greedy or sampling decoding (num_beams=1); use return_audio=False.")
        if return_audio or streams_audio:
            EchoXVoicer(self, generation_config, tokenizer)  # refuses a rule it cannot run before any work is done
        eos_ids = generation_config.eos_token_id
        eos_ids = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))

        prompt = self._prepare_prompt(
            input_ids, attention_mask, input_features, padding_side="left", return_ctc_logits=False
        )
        # The final-layer state that produced each token, collected step by step (no other layer is kept).
        producing_states = []
        if streams_audio:
            streamer.start(EchoXVoicer(self, generation_config, tokenizer), eos_ids)
            model_kwargs["hidden_states_callback"] = streamer.put_hidden_state
        elif return_audio:
            model_kwargs["hidden_states_callback"] = producing_states.append
        reuse = reuse_prompt_prefix and generation_config.use_cache is not False
        if reuse and "past_key_values" not in model_kwargs:
            prefix = self.prompt_prefix_cache.seed(
                self.language_model, input_ids, prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids,
                self.config.audio_token_id,
            )
            if prefix is not None:
                model_kwargs["past_key_values"] = prefix
        generated = super().generate(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            generation_config=generation_config,
            streamer=streamer,
            **model_kwargs,
        )
        sequences = generated.sequences
        answers = []
        for row in sequences.tolist():
            ends = [i for i, token in enumerate(row) if token in eos_ids]
            answers.append(row[: ends[0]] if ends else row)

        text = None
        if tokenizer is not None:
            text = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
        output = EchoXGenerationOutput(sequences=sequences, text=text, sampling_rate=self.config.vocoder_config.sampling_rate)
        if not return_audio or streams_audio:
            return output

        states = torch.stack(producing_states, dim=1)
        output.segments, output.segment_unit_ids, output.unit_ids, output.waveforms = [], [], [], []
        for row, answer in enumerate(answers):
            voicer = EchoXVoicer(self, generation_config, tokenizer)
            segments = [voicer.add(token, states[row, i]) for i, token in enumerate(answer)]
            segments = [segment for segment in [*segments, voicer.finish()] if segment is not None]
            chunks = voicer.voice(segments)
            spoken = [(segment, chunk) for segment, chunk in zip(segments, chunks) if segment.end > segment.start]
            output.segments.append([(segment.start, segment.end) for segment, _ in spoken])
            output.segment_unit_ids.append([chunk.unit_ids for _, chunk in spoken])
            output.unit_ids.append([unit for _, chunk in spoken for unit in chunk.unit_ids])
            audio = [torch.from_numpy(chunk.audio) for chunk in chunks]
            output.waveforms.append(torch.cat(audio) if audio else torch.zeros(0))
        return output

    def stream(
        self,
        input_ids: torch.LongTensor,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        tokenizer=None,
        segmentation_mode: str | None = None,
        timeout: float | None = None,
        **generate_kwargs,
    ) -> Iterator[EchoXStreamChunk]:
        """
        Answer one request and yield its spoken segments as soon as each is voiced (`EchoXStreamChunk`: text, 16 kHz
        float32 audio, unit ids): `generate` with an [`EchoXAudioStreamer`], in a thread of its own. Joined, the chunks'
        audio equals `generate`'s waveform for the same request.
        """
        streamer = EchoXAudioStreamer(timeout=timeout)

        def run():
            try:
                self.generate(
                    input_ids=input_ids,
                    input_features=input_features,
                    attention_mask=attention_mask,
                    tokenizer=tokenizer,
                    segmentation_mode=segmentation_mode,
                    streamer=streamer,
                    **generate_kwargs,
                )
            except Exception as error:
                streamer.fail(error)

        worker = Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


__all__ = ["EchoXPreTrainedModel", "EchoXForSpeechToSpeech", "EchoXOutput", "EchoXGenerationOutput"]
