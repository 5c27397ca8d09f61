"""
The speech side of the EchoX prompt: log-mel features → speech encoder → speech adapter, and the prompt embeddings
with each `<audio>` placeholder replaced by its clip's speech embeddings (`EchoXSpeechPromptMixin`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .dictation_search import LanguageModelPrefixScorer, ctc_prefix_beam_search
from .generation_configuration_echox import check_dictation_search

IGNORE_INDEX = -100
AUDIO_CROP_MARGIN = 4  # encoder frames kept after a clip's real audio when `crop_audio_padding` is on


@dataclass
class _PromptInputs:
    inputs_embeds: torch.Tensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    labels: torch.LongTensor | None
    ctc_logits: torch.Tensor | None
    ctc_lengths: torch.LongTensor | None = None
    dictation: list[torch.LongTensor] | None = None


class EchoXSpeechPromptMixin:
    """
    Speech in, for `EchoXForSpeechToSpeech`: encode audio (`encode_audio`), adapt it to the LLM
    (`get_speech_embeddings`) and build the prompt's embeddings, attention mask and position ids (`_prepare_prompt`).
    """

    def get_speech_embeddings(
        self,
        input_features: torch.FloatTensor | None = None,
        encoder_states: torch.FloatTensor | None = None,
        audio_frame_lengths: torch.LongTensor | None = None,
        return_ctc_logits: bool = True,
        dictation_contexts: list[list[int]] | None = None,
        dictation_beam_size: int = 1,
        dictation_lm_weight: float = 0.0,
        dictation_length_bonus: float = 0.0,
    ):
        """
        Log-mel features `[N, n_mels, frames]` → `SpeechAdapterOutput` (speech embeddings per clip, CTC logits unless
        `return_ctc_logits=False`).
        With `adapter_output="dictation"`, `dictation_beam_size > 1` or `dictation_lm_weight > 0` find each clip's
        dictation by CTC prefix beam search with the LLM as language model (`dictation_search`), the LLM reading the
        clip's words after `dictation_contexts[clip]` (the prompt ids in front of its placeholder), and
        `dictation_length_bonus` added per dictated token.
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
        dictate = None
        if dictation_beam_size > 1 or dictation_lm_weight > 0:
            dictate = self._dictation_search(dictation_contexts or [[] for _ in range(states.shape[0])],
                                             dictation_beam_size, dictation_lm_weight, dictation_length_bonus)
        return self.speech_adapter(states.to(self.speech_adapter.projector.weight.dtype), frame_counts, return_ctc_logits,
                                   token_embedding=self.get_input_embeddings(), dictate=dictate)

    def _dictation_search(self, contexts: list[list[int]], beam_size: int, lm_weight: float, length_bonus: float):
        """`dictate(clip, log_probs)` for the adapter: `ctc_prefix_beam_search` with the LLM after `contexts[clip]`."""
        if self.config.adapter_output != "dictation":
            raise ValueError(
                f"dictation_beam_size / dictation_lm_weight apply to adapter_output='dictation'; this model's "
                f"adapter_output is {self.config.adapter_output!r}."
            )
        check_dictation_search(beam_size, lm_weight, length_bonus)
        pad_id = self.config.text_pad_token_id if self.config.text_pad_token_id is not None else 0
        end_id = self.config.text_pad_token_id  # the end-of-turn token of EchoX's prompts: where the user's words end
        masked = [end_id] if self.config.mask_eot_in_prompt and end_id is not None else []

        def dictate(clip: int, log_probs: torch.Tensor) -> list[int]:
            if lm_weight and not contexts[clip]:
                raise ValueError("dictation_lm_weight needs prompt text in front of the speech for the LLM to read the "
                                 "dictated words after (e.g. the chat template's user header).")
            scorer = LanguageModelPrefixScorer(self.language_model, contexts[clip], pad_id, masked) if lm_weight else None
            return ctc_prefix_beam_search(log_probs, self.config.audio_token_id, beam_size, lm_weight, scorer, end_id,
                                          length_bonus)

        return dictate

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
        dictation_beam_size=1,
        dictation_lm_weight=0.0,
        dictation_length_bonus=0.0,
    ):
        """
        Embed `input_ids`, replace each `<audio>` placeholder by its clip's speech embeddings (clips in row-major
        order), re-pad the batch on `padding_side`, and build the attention mask (padding, plus every eot when
        `mask_eot_in_prompt`) and position ids (contiguous over non-padding tokens, masked eots included).
        `return_ctc_logits=False` when only the speech embeddings are needed (generation).
        `dictation_beam_size`, `dictation_lm_weight`, `dictation_length_bonus`: see `get_speech_embeddings`; the
        language model reads each clip's words after its row's prompt ids in front of its placeholder.
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
        contexts = None
        if dictation_beam_size > 1 or dictation_lm_weight > 0:
            contexts = [
                row_ids[:position].tolist()
                for row_ids in (input_ids[row][attention_mask[row].bool()] for row in range(input_ids.shape[0]))
                for position in torch.nonzero(row_ids == self.config.audio_token_id).flatten().tolist()
            ]
        speech = (
            self.get_speech_embeddings(input_features, encoder_states, audio_frame_lengths, return_ctc_logits,
                                       contexts, dictation_beam_size, dictation_lm_weight, dictation_length_bonus)
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
            dictation=speech.dictation if speech is not None else None,
        )
