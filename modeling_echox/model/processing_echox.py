"""Processor of EchoX: audio + text prompt → `input_ids` (one speech placeholder per clip) and Whisper features."""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file, logging

from .audio_io import DEFAULT_MAX_SECONDS, load_audio
from .conversation import EchoXTurn, read_conversation, single_turns
from .unit_vocabulary import UNIT_VOCAB_FILE, EchoXUnitVocabulary

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
PROMPT_FORMATS = ("llama3_pieces", "chat_template")

_START_HEADER = "<|start_header_id|>"
_END_HEADER = "<|end_header_id|>"
_EOT = "<|eot_id|>"
logger = logging.get_logger(__name__)
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


class EchoXProcessor(ProcessorMixin):
    r"""
    Builds EchoX prompts. Wraps a `WhisperFeatureExtractor` (speech → log-mel features of the 30 s window), the LLM
    tokenizer and the unit-language vocabulary ([`EchoXUnitVocabulary`], stored as `unit_vocab.txt`).

    A prompt holds one `audio_token` id per audio clip (one per user turn with audio); the model replaces each by its
    clip's (variable number of) speech vectors. Requests are single turns (`audio` / `text`) or conversations
    (`conversation`, see `read_conversation`), laid out as the released template does (`build_conversation_ids`).

    Args:
        feature_extractor (`WhisperFeatureExtractor`): computes `input_features`.
        tokenizer: the LLM tokenizer; must know `audio_token` as a single token.
        unit_vocabulary (`EchoXUnitVocabulary`, *optional*): the unit-language pieces, used by `decode_units`.
        audio_token (`str`): the speech placeholder (`"<audio_patch>"` in the released Llama-3 checkpoints).
        system_prompt (`str`): the system message (default: the original EchoX one).
        prompt_format (`str`):
            - `"llama3_pieces"` (default, the original): the prompt is assembled from separately tokenized pieces, so a
              Llama-3 tokenizer prepends `<|begin_of_text|>` to each piece (see `build_conversation_ids`).
            - `"chat_template"`: `tokenizer.apply_chat_template` on the turns (the audio placeholder first in a user
              turn) with the generation prompt (uses the processor's `chat_template` if set, else the tokenizer's).
        max_audio_seconds (`float`): longest accepted clip; longer clips are refused (unless `truncate_long_audio`).
        truncate_long_audio (`bool`): cut longer clips to `max_audio_seconds`, with a warning, as the released EchoX's
            feature extractor does with its 30 s window (default `False`: refuse them, naming the length).
        chat_template (`str`, *optional*): a Jinja chat template for `prompt_format="chat_template"`.
        unit_token_offset (`int`, *optional*): echo-decoder id of the first unit token (the model config's), for
            `decode_units`.
        num_units (`int`, *optional*): acoustic units the vocoder knows (the model config's), for `decode_units`.
        max_prompt_length (`int`, *optional*): cut longer prompts to their first ids, with a warning, as the released
            EchoX does with 1024; `None` (default): never cut.
    """

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        unit_vocabulary: EchoXUnitVocabulary | None = None,
        audio_token: str = "<audio>",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prompt_format: str = "llama3_pieces",
        max_audio_seconds: float = DEFAULT_MAX_SECONDS,
        chat_template: str | None = None,
        unit_token_offset: int | None = None,
        num_units: int | None = None,
        max_prompt_length: int | None = None,
        truncate_long_audio: bool = False,
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
        if unit_vocabulary is not None and not isinstance(unit_vocabulary, EchoXUnitVocabulary):
            raise TypeError(f"unit_vocabulary must be an EchoXUnitVocabulary, got {type(unit_vocabulary).__name__}.")
        window_seconds = feature_extractor.n_samples / feature_extractor.sampling_rate
        if not 0 < max_audio_seconds <= window_seconds:
            raise ValueError(
                f"max_audio_seconds must be in (0, {window_seconds:g}] (the feature extractor's window), "
                f"got {max_audio_seconds}."
            )
        audio_ids = tokenizer.encode(audio_token, add_special_tokens=False)
        if len(audio_ids) != 1 or audio_ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"The audio placeholder {audio_token!r} is not a single token of the tokenizer (got ids {audio_ids}); "
                "add it as a special token first."
            )
        if audio_token in system_prompt:
            raise ValueError(f"The system prompt must not contain the audio placeholder {audio_token!r}.")
        self.audio_token = audio_token
        self.audio_token_id = audio_ids[0]
        self.system_prompt = system_prompt
        self.prompt_format = prompt_format
        self.max_audio_seconds = float(max_audio_seconds)
        self._unit_vocabulary = unit_vocabulary
        limits = (("unit_token_offset", unit_token_offset), ("num_units", num_units), ("max_prompt_length", max_prompt_length))
        for name, value in limits:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.unit_token_offset = unit_token_offset
        self.num_units = num_units
        self.max_prompt_length = max_prompt_length
        self.truncate_long_audio = bool(truncate_long_audio)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        if prompt_format == "llama3_pieces":
            self._llama3_special_ids()  # fail early if the tokenizer lacks the Llama-3 header tokens

    # ------------------------------------------------------------------ unit vocabulary

    @property
    def unit_vocabulary(self) -> EchoXUnitVocabulary | None:
        return self._unit_vocabulary

    @unit_vocabulary.setter
    def unit_vocabulary(self, value: EchoXUnitVocabulary | None):
        if value is not None and not isinstance(value, EchoXUnitVocabulary):
            raise TypeError(f"unit_vocabulary must be an EchoXUnitVocabulary, got {type(value).__name__}.")
        self._unit_vocabulary = value

    def _require_unit_vocabulary(self) -> EchoXUnitVocabulary:
        if self._unit_vocabulary is None:
            raise ValueError(
                f"This {self.__class__.__name__} has no unit vocabulary: pass `unit_vocabulary=` or load a directory "
                f"that contains {UNIT_VOCAB_FILE}."
            )
        return self._unit_vocabulary

    @property
    def unit_tokens(self) -> list[str]:
        """The unit-language tokens `<|unit_PIECE|>`, in id order (id = `unit_token_offset + index`)."""
        return self._require_unit_vocabulary().tokens

    def decode_units(self, ids) -> list[int]:
        """
        The acoustic unit ids the vocoder receives for one echo-decoder output, read exactly as the released EchoX
        reads it. `ids` (a list or a 1-D tensor) are echo-decoder ids: unit tokens (`unit_token_offset + i` for
        `<|unit_PIECE_i|>`) and possibly text ids below the offset. The ids are decoded to one string (text ids by the
        tokenizer, special tokens kept; unit ids as their `<|unit_PIECE|>` tokens); if it contains "▁" only the unit
        payloads are kept, joined with nothing in between; every decimal integer is then a unit, and integers ≥
        `num_units` are dropped ([`EchoXUnitVocabulary.decode_text`]). So `<|unit_▁837_8|><|unit_1_194|>` is
        `[837, 81, 194]`.
        """
        vocabulary = self._require_unit_vocabulary()
        if self.unit_token_offset is None or self.num_units is None:
            raise ValueError(
                f"This {self.__class__.__name__} does not know `unit_token_offset` and `num_units`; pass them when "
                "building it (they are the model config's)."
            )
        values = ids.detach().cpu() if hasattr(ids, "detach") else ids
        array = np.asarray(values)
        if array.ndim != 1 and array.size:
            raise ValueError(f"decode_units expects one 1-D sequence of ids, got shape {tuple(array.shape)}.")
        parts: list[str] = []
        text_run: list[int] = []
        for token_id in array.reshape(-1).tolist():
            token_id = int(token_id)
            if token_id < 0:
                raise ValueError(f"decode_units: negative token id {token_id}.")
            if token_id < self.unit_token_offset:
                text_run.append(token_id)
                continue
            if text_run:
                parts.append(self.tokenizer.decode(text_run, skip_special_tokens=False))
                text_run = []
            index = token_id - self.unit_token_offset
            if index >= len(vocabulary):
                raise ValueError(
                    f"decode_units: id {token_id} is beyond the unit vocabulary ({len(vocabulary)} tokens from "
                    f"offset {self.unit_token_offset})."
                )
            parts.append(vocabulary.token(index))
        if text_run:
            parts.append(self.tokenizer.decode(text_run, skip_special_tokens=False))
        return vocabulary.decode_text("".join(parts), self.num_units)

    # ------------------------------------------------------------------ text decoding

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """Decode LLM output ids to text (special tokens skipped by default)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode a batch of LLM output ids to texts (special tokens skipped by default)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    # ------------------------------------------------------------------ prompt building

    def _llama3_special_ids(self) -> tuple[int, int, int]:
        ids = []
        for token in (_START_HEADER, _END_HEADER):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(
                    f"prompt_format='llama3_pieces' needs the Llama-3 token {token} in the tokenizer; use "
                    "prompt_format='chat_template' for other tokenizers."
                )
            ids.append(token_id)
        eot_id = self.tokenizer.convert_tokens_to_ids(_EOT)
        if eot_id is None or eot_id == self.tokenizer.unk_token_id:
            eot_id = self.tokenizer.eos_token_id
        if eot_id is None:
            raise ValueError("prompt_format='llama3_pieces' needs an <|eot_id|> (or eos) token in the tokenizer.")
        return ids[0], ids[1], eot_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def build_prompt_ids(self, text: str = "", has_audio: bool = True) -> list[int]:
        """The token ids of a single-turn prompt: `build_conversation_ids` of one user turn (with audio or not)."""
        return self.build_conversation_ids([EchoXTurn("user", text, audio=True if has_audio else None)])

    def build_conversation_ids(self, turns: list[EchoXTurn]) -> list[int]:
        """
        The token ids of a conversation (`EchoXTurn`s, see `read_conversation`), ending where the assistant's answer
        starts. Each user turn with audio holds exactly one `audio_token_id`, placed before its text. A first system
        turn replaces the processor's `system_prompt`.

        `"llama3_pieces"` layout, as the released EchoX builds it (each `enc(...)` is a separate tokenizer call with
        special tokens, i.e. BOS first for a Llama-3 tokenizer):

            enc("")
            <|start_header_id|> enc("system") <|end_header_id|>  enc("\\n")  enc(system_prompt) <|eot_id|>
            then per turn:
            user with audio:  <|start_header_id|> enc("user") <|end_header_id|>  enc("\\n" + audio_token)  enc(text) <|eot_id|>
            user, text only:  <|start_header_id|> enc("user") <|end_header_id|>  enc(text) <|eot_id|>
            assistant:        <|start_header_id|> enc("assistant") <|end_header_id|>  enc("\\n")  enc(text) <|eot_id|>
            and last:         <|start_header_id|> enc("assistant") <|end_header_id|>  enc("\\n")

        `"chat_template"`: `apply_chat_template` on the messages (the audio placeholder first in a user turn's text),
        with the generation prompt. With `max_prompt_length`, a longer prompt is cut to its first `max_prompt_length`
        ids, with a warning, as the released EchoX does (a cut that would drop an audio placeholder is refused).
        """
        for turn in turns:
            if self.audio_token in turn.text:
                raise ValueError(
                    f"The text prompt contains the audio placeholder {self.audio_token!r}; pass the audio through "
                    "`audio=` instead (the processor inserts the placeholder)."
                )
        system_prompt = self.system_prompt
        if turns and turns[0].role == "system":
            system_prompt, turns = turns[0].text, turns[1:]
        if self.prompt_format == "chat_template":
            ids = self._build_with_chat_template(system_prompt, turns)
        else:
            ids = self._build_llama3_pieces(system_prompt, turns)
        return self._cut(ids)

    def _build_llama3_pieces(self, system_prompt: str, turns: list[EchoXTurn]) -> list[int]:
        start_header, end_header, eot = self._llama3_special_ids()

        def header(role: str) -> list[int]:
            return [start_header, *self._encode(role), end_header]

        ids = list(self._encode(""))
        ids += header("system") + self._encode("\n") + self._encode(system_prompt) + [eot]
        for turn in turns:
            if turn.role == "assistant":
                ids += header("assistant") + self._encode("\n") + self._encode(turn.text) + [eot]
            elif turn.audio is not None:
                ids += header("user") + self._encode("\n" + self.audio_token) + self._encode(turn.text) + [eot]
            else:
                ids += header("user") + self._encode(turn.text) + [eot]
        ids += header("assistant") + self._encode("\n")
        return ids

    def _build_with_chat_template(self, system_prompt: str, turns: list[EchoXTurn]) -> list[int]:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("prompt_format='chat_template' needs a chat template (processor or tokenizer).")
        messages = [{"role": "system", "content": system_prompt}]
        for turn in turns:
            placeholder = self.audio_token if turn.audio is not None else ""
            messages.append({"role": turn.role, "content": placeholder + turn.text})
        encoded = self.tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def _cut(self, ids: list[int]) -> list[int]:
        if self.max_prompt_length is None or len(ids) <= self.max_prompt_length:
            return ids
        kept = ids[: self.max_prompt_length]
        if kept.count(self.audio_token_id) != ids.count(self.audio_token_id):
            raise ValueError(
                f"The prompt has {len(ids)} ids; cutting it to max_prompt_length={self.max_prompt_length} would drop "
                "an audio placeholder. Shorten the conversation."
            )
        logger.warning(
            "The prompt has %d ids, more than max_prompt_length=%d: it is cut to its first %d ids, as the released "
            "EchoX does (the end of the prompt, with the assistant header, is lost).",
            len(ids), self.max_prompt_length, self.max_prompt_length,
        )
        return kept

    # ------------------------------------------------------------------ __call__

    def _truncated(self, waveform: np.ndarray) -> np.ndarray:
        """`waveform` cut to `max_audio_seconds` when `truncate_long_audio` (with a warning), else as it is."""
        limit = int(self.max_audio_seconds * self.feature_extractor.sampling_rate)
        if not self.truncate_long_audio or waveform.shape[0] <= limit:
            return waveform
        logger.warning(
            "A clip of %.2f s is cut to its first %g s (truncate_long_audio=True, as the released EchoX does).",
            waveform.shape[0] / self.feature_extractor.sampling_rate, self.max_audio_seconds,
        )
        return waveform[:limit]

    def _conversations(self, audio, text, conversation) -> list[list[EchoXTurn]]:
        """The batch as conversations: the given ones, or one single user turn per clip / text."""
        if conversation is None:
            return single_turns(audio, text)
        if audio is not None or text is not None:
            raise ValueError("Pass either `conversation` or `audio` / `text`, not both: a conversation holds its audio and text.")
        if not isinstance(conversation, (list, tuple)):
            raise ValueError(
                "`conversation` must be a list of {'role', 'content'} messages, or a list of such lists (a batch)."
            )
        is_batch = bool(conversation) and all(isinstance(item, (list, tuple)) for item in conversation)
        batch = conversation if is_batch else [conversation]
        return [read_conversation(item, self.audio_token) for item in batch]

    def __call__(
        self,
        audio=None,
        text: str | list[str] | None = None,
        sampling_rate: int | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        conversation=None,
    ) -> BatchFeature:
        """
        Prepare a batch of requests: single turns (`audio` and/or `text`) or conversations.

        Args:
            audio: one clip or a list of clips (paths, arrays / tensors with `sampling_rate`, `{"array",
                "sampling_rate"}` dicts; see `load_audio`). `None` entries in a list make text-only samples.
            text: the user's text prompt, or one per clip (default `""` for audio turns). A single string with
                several clips applies to every clip. Must not contain the audio placeholder.
            sampling_rate: sample rate of array clips (files and `{"array", "sampling_rate"}` dicts carry their own).
            padding_side: `"left"` (default, for generation) or `"right"`.
            return_tensors: `"pt"`, `"np"` or `None` (python lists).
            conversation: instead of `audio` / `text`, one conversation or a list of them: `{"role", "content"}`
                messages (see `read_conversation`: system first if any, user turns with at most one audio part, assistant
                text, a user turn last). Every audio turn's clip is encoded, in order.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `[B, L]` (padded with the tokenizer's pad id;
            mask 0 = padding only), and when any audio is given `input_features` `[num_clips, n_mels, 3000]` in
            batch order (within a sample, in turn order).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        conversations = self._conversations(audio, text, conversation)

        waveforms = []
        sequences = []
        for turns in conversations:
            if all(turn.audio is None and not turn.text for turn in turns if turn.role == "user"):
                raise ValueError("A sample has neither audio nor text.")
            for turn in turns:
                if turn.audio is None:
                    continue
                clip = turn.audio
                # files and dicts with a "sampling_rate" carry their own rate; `sampling_rate` is for bare arrays
                own_rate = isinstance(clip, Mapping) and clip.get("sampling_rate") is not None
                waveform = load_audio(
                    clip,
                    sampling_rate=None if own_rate else sampling_rate,
                    target_rate=self.feature_extractor.sampling_rate,
                    max_seconds=None if self.truncate_long_audio else self.max_audio_seconds,
                )
                waveforms.append(self._truncated(waveform))
            ids = self.build_conversation_ids(turns)
            expected = sum(turn.audio is not None for turn in turns)
            if ids.count(self.audio_token_id) != expected:  # pragma: no cover - guarded by the text check
                raise ValueError(f"Internal error: prompt has {ids.count(self.audio_token_id)} audio placeholders.")
            sequences.append(ids)

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad with.")
        max_len = max(len(ids) for ids in sequences)
        input_ids = np.full((len(sequences), max_len), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), max_len), dtype=np.int64)
        for row, ids in enumerate(sequences):
            span = slice(max_len - len(ids), max_len) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1

        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors is None:
            data = {key: value.tolist() for key, value in data.items()}
        if waveforms:
            features = self.feature_extractor(
                waveforms,
                sampling_rate=self.feature_extractor.sampling_rate,
                padding="max_length",
                return_attention_mask=False,
                return_tensors="np",
            )
            data["input_features"] = features["input_features"]
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features"]

    # ------------------------------------------------------------------ serialization

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the feature extractor, tokenizer, processor config and (if any) `unit_vocab.txt`."""
        hub_kwargs = {}
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            for key in ("commit_message", "commit_description", "token", "private", "revision", "create_pr"):
                if key in kwargs:
                    hub_kwargs[key] = kwargs.pop(key)
        files = super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        if self._unit_vocabulary is not None:
            files.append(self._unit_vocabulary.save_pretrained(os.fspath(save_directory)))
        if push_to_hub:
            self.push_to_hub(repo_id, **hub_kwargs)
        return files

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, unit_vocabulary: EchoXUnitVocabulary | None = None, **kwargs
    ):
        """
        Load the processor; `unit_vocab.txt` (if present) becomes its unit vocabulary. A processor saved without
        `unit_token_offset` / `num_units` takes them from the model config (`config.json`) beside it, if any.
        """
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
        if processor.unit_token_offset is None or processor.num_units is None:
            config_path = cached_file(
                pretrained_model_name_or_path,
                "config.json",
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **hub_kwargs,
            )
            if config_path is not None:
                with open(config_path, encoding="utf-8") as handle:
                    model_config = json.load(handle)
                processor.unit_token_offset = processor.unit_token_offset or model_config.get("unit_token_offset")
                processor.num_units = processor.num_units or model_config.get("num_units")
        if unit_vocabulary is None:
            path = cached_file(
                pretrained_model_name_or_path,
                UNIT_VOCAB_FILE,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **hub_kwargs,
            )
            if path is not None:
                unit_vocabulary = EchoXUnitVocabulary.from_file(path)
        processor.unit_vocabulary = unit_vocabulary
        return processor


__all__ = ["DEFAULT_SYSTEM_PROMPT", "EchoXProcessor"]
