"""EchoX: a speech-to-speech LLM with an echo decoder (arXiv 2509.09174), as a transformers model."""

from collections.abc import Iterator
from threading import Thread

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .configuration_echox import EchoXConfig
from .echo_decoder import EchoXEchoDecoder
from .generation_configuration_echox import EchoXGenerationConfig
from .model_outputs import EchoXGenerationOutput, EchoXOutput
from .prompt_cache import PromptPrefixCache
from .speech_adapter import EchoXSpeechAdapter
from .speech_prompt import IGNORE_INDEX, EchoXSpeechPromptMixin
from .streaming import EchoXAudioStreamer, EchoXStreamChunk
from .training_losses import EchoXTrainingLossesMixin
from .vocoder import EchoXCodeHifiGan
from .voicing import EchoXVoicer


class EchoXPreTrainedModel(PreTrainedModel):
    config: EchoXConfig
    generation_config_class = EchoXGenerationConfig
    base_model_prefix = ""
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["EchoXSpeechAdapter"]  # the sub-models add their own layers in post_init
    _skip_keys_device_placement = ["past_key_values"]
    # The unit vocoder runs in float32 whatever dtype the rest is loaded in, as the released EchoX runs it.
    _keep_in_fp32_modules_strict = ["vocoder"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EchoXForSpeechToSpeech):
            module.unit_table.fill_(-1)


class EchoXForSpeechToSpeech(EchoXSpeechPromptMixin, EchoXTrainingLossesMixin, EchoXPreTrainedModel, GenerationMixin):
    """
    The whole EchoX: `audio_tower` (Whisper encoder) → `speech_adapter` → `language_model` (any causal LM) →
    `echo_decoder` → `vocoder` (unit HiFi-GAN). `unit_table` maps each unit-language token to its acoustic unit ids.
    Speech in and prompt building: `EchoXSpeechPromptMixin` (speech_prompt.py); training losses:
    `EchoXTrainingLossesMixin` (training_losses.py).
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
        """
        Acoustic unit ids of generated echo-decoder ids, read piece by piece through the unit table (text ids and
        units ≥ K dropped). For a unit language whose pieces hold whole units this equals
        `EchoXProcessor.decode_units` (the released rule); one that splits unit ids across pieces
        (`config.unit_pieces_split_units`) can only be read by the processor, and is refused here.
        """
        if self.config.unit_pieces_split_units:
            raise ValueError(
                "This checkpoint's unit language splits unit ids across tokens (e.g. '▁837_8' + '1_194'), so its "
                "echo-decoder output can only be read joined: pass `processor=` (its `decode_units`) to speak."
            )
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
        unit_decoder=None,
    ) -> list[list[int]]:
        """
        Echo decoder for a list of text segments (their LLM hidden states `[n_i, H]` and, for a spelling decoder,
        their token ids `[n_i]`): the unit ids of each (at most `max_new_tokens` echo-decoder tokens per segment),
        read by `unit_decoder` (echo-decoder ids → unit ids, e.g. `EchoXProcessor.decode_units`; default: the
        model's unit table, `units_from_echo_ids`).
        """
        decode = unit_decoder if unit_decoder is not None else self.units_from_echo_ids
        echo_ids = self.echo_decoder.generate(
            hidden_states, self.text_table, max_new_tokens=max_new_tokens, token_ids=token_ids
        )
        return [decode(ids) for ids in echo_ids]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        generation_config=None,
        return_audio: bool = True,
        tokenizer=None,
        processor=None,
        segmentation_mode: str | None = None,
        streamer=None,
        reuse_prompt_prefix: bool = True,
        conversation=None,
        **kwargs,
    ) -> EchoXGenerationOutput:
        """
        Answer a batch of prompts (speech or text-only; different lengths) in text and, with `return_audio`, speech.
        Text decoding is transformers' `generate` (greedy or sampling per `generation_config` / kwargs). The answer is
        spoken by an [`EchoXVoicer`]: cut into segments by the generation config's segmentation rule
        (`segmentation_mode`: "faithful", the released one, or "fast"; `None`: the generation config's), each segment
        spoken by the echo decoder, and the vocoder voicing the segments one after another. EchoX's generation fields
        (`EchoXGenerationConfig`) can be passed as kwargs like transformers' own.

        `processor`: an [`EchoXProcessor`]; its `decode_units` reads the echo decoder's output exactly as the released
        EchoX does (needed for a unit language that splits unit ids across tokens, `config.unit_pieces_split_units`;
        otherwise the model's unit table gives the same units), and its tokenizer is used when `tokenizer` is not given.
        `streamer`: a text streamer (e.g. `TextIteratorStreamer`), or an [`EchoXAudioStreamer`] that receives the
        spoken segments while the text is being generated (batch size 1; the returned output then holds text only).
        `conversation`: instead of `input_ids` / `input_features`, a conversation (or a batch of them) in the chat-message
        format of [`EchoXProcessor`], which `processor` turns into the prompt; the answer is the next assistant turn.
        `reuse_prompt_prefix`: for a single request, start from the kept key/value cache of the text in front of the
        speech (system prompt, template head; see `PromptPrefixCache`) instead of prefilling it again.
        """
        if conversation is not None:
            input_ids, attention_mask, input_features = self._conversation_inputs(
                conversation, processor, input_ids, input_features
            )
        if input_ids is None:
            raise ValueError("EchoX.generate needs input_ids (build them with EchoXProcessor).")
        if processor is not None and tokenizer is None:
            tokenizer = processor.tokenizer
        unit_decoder = processor.decode_units if processor is not None else None
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
        if (return_audio or streams_audio) and unit_decoder is None and self.config.unit_pieces_split_units:
            self.units_from_echo_ids([])  # refused at once, before any work: see its message
        # One voicer per answer, made before any work: a segmentation rule it cannot run is refused at once.
        voicers = (
            [EchoXVoicer(self, generation_config, tokenizer, unit_decoder) for _ in range(input_ids.shape[0])]
            if return_audio or streams_audio
            else []
        )
        eos_ids = generation_config.eos_token_id
        eos_ids = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))

        prompt = self._prepare_prompt(
            input_ids, attention_mask, input_features, padding_side="left", return_ctc_logits=False,
            dictation_beam_size=generation_config.dictation_beam_size,
            dictation_lm_weight=generation_config.dictation_lm_weight,
            dictation_length_bonus=generation_config.dictation_length_bonus,
        )
        # The final-layer state that produced each token, collected step by step (no other layer is kept).
        producing_states = []
        if streams_audio:
            streamer.start(voicers[0], eos_ids)
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
        output = EchoXGenerationOutput(sequences=sequences, text=text, sampling_rate=self.config.vocoder_config.sampling_rate,
                                       dictation=prompt.dictation)
        if not return_audio or streams_audio:
            return output

        states = torch.stack(producing_states, dim=1)
        output.segments, output.segment_unit_ids, output.unit_ids, output.waveforms = [], [], [], []
        for row, (answer, voicer) in enumerate(zip(answers, voicers)):
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

    def _conversation_inputs(self, conversation, processor, input_ids, input_features):
        """`input_ids`, `attention_mask` and `input_features` of a conversation, built by `processor`."""
        if processor is None:
            raise ValueError("generate(conversation=...) needs `processor=` (an EchoXProcessor) to build the prompt.")
        if input_ids is not None or input_features is not None:
            raise ValueError("Pass either `conversation` or `input_ids` / `input_features`, not both.")
        inputs = processor(conversation=conversation)
        features = inputs.get("input_features")
        if features is not None:
            features = features.to(self.device, self.audio_tower.conv1.weight.dtype)
        return inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device), features

    def stream(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        tokenizer=None,
        processor=None,
        segmentation_mode: str | None = None,
        timeout: float | None = None,
        conversation=None,
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
                    processor=processor,
                    segmentation_mode=segmentation_mode,
                    streamer=streamer,
                    conversation=conversation,
                    **generate_kwargs,
                )
            except Exception as error:
                streamer.fail(error)

        worker = Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


__all__ = ["EchoXPreTrainedModel", "EchoXForSpeechToSpeech", "EchoXOutput", "EchoXGenerationOutput"]
