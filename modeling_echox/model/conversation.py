"""
EchoX conversations: the turns a prompt is built from (system, user with audio and/or text, assistant text), read from
transformers' chat-message format and checked.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
_AUDIO_KEYS = ("audio", "path", "array")


@dataclass
class EchoXTurn:
    """
    One turn: `role` ("system", "user" or "assistant"), its `text`, and for a user turn at most one audio clip
    (`audio`: a path, an array / tensor, or a `{"array", "sampling_rate"}` dict, as `load_audio` takes).
    """

    role: str
    text: str = ""
    audio: Any = None


def _content_parts(content, where: str) -> tuple[str, list[Any]]:
    """The text (parts joined in order) and the audio clips of a message's `content`."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}.")
    texts, clips = [], []
    for part in content:
        if not isinstance(part, Mapping) or "type" not in part:
            raise ValueError(f"{where}: each content part must be a dict with a 'type' ('text' or 'audio'), got {part!r}.")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: a text part needs a string under 'text'.")
            texts.append(part["text"])
        elif part["type"] == "audio":
            keys = [key for key in _AUDIO_KEYS if part.get(key) is not None]
            if len(keys) != 1:
                raise ValueError(f"{where}: an audio part needs exactly one of {list(_AUDIO_KEYS)}, got {sorted(part)}.")
            clip = part[keys[0]]
            if keys[0] == "array":
                clip = {"array": clip, "sampling_rate": part.get("sampling_rate")}
            clips.append(clip)
        else:
            raise ValueError(f"{where}: unknown content part type {part['type']!r}; use 'text' or 'audio'.")
    return "".join(texts), clips


def read_conversation(conversation, audio_token: str) -> list[EchoXTurn]:
    """
    The turns of one conversation: a list of `{"role": ..., "content": ...}` messages (transformers' chat format),
    `content` a string or a list of `{"type": "text", "text": ...}` and `{"type": "audio", "audio" | "path" |
    "array": ...}` parts. Rules: a system message may only come first; a user turn holds at most one audio clip;
    assistant turns are text; the last turn is the user's (the model answers it); no text may hold `audio_token`.
    Raises `ValueError` naming the message at fault.
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence) or not conversation:
        raise ValueError("A conversation must be a non-empty list of {'role', 'content'} messages.")
    turns = []
    for index, message in enumerate(conversation):
        where = f"conversation message {index}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {message!r}.")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; use one of {ROLES}.")
        text, clips = _content_parts(message["content"], where)
        if audio_token in text:
            raise ValueError(
                f"{where}: the text holds the audio placeholder {audio_token!r}; pass audio as an audio part."
            )
        if role == "system" and index != 0:
            raise ValueError(f"{where}: a system message may only be the first.")
        if role != "user" and clips:
            raise ValueError(f"{where}: only user turns carry audio.")
        if len(clips) > 1:
            raise ValueError(f"{where}: a user turn holds at most one audio clip, got {len(clips)}.")
        if role == "user" and not clips and not text:
            raise ValueError(f"{where}: a user turn needs audio, text, or both.")
        turns.append(EchoXTurn(role, text, clips[0] if clips else None))
    if turns[-1].role != "user":
        raise ValueError("The last message of a conversation must be the user's: the model answers it.")
    return turns


def is_conversation(value) -> bool:
    """Whether `value` looks like one conversation (a non-empty list of dicts with a 'role')."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) > 0
        and all(isinstance(message, Mapping) and "role" in message for message in value)
    )


def _is_clip(value: Any) -> bool:
    """One audio clip (as opposed to a batch of clips): a path, an array / tensor or a dict."""
    return isinstance(value, (str, os.PathLike, Mapping, np.ndarray)) or type(value).__module__.startswith("torch")


def single_turns(audio, text) -> list[list[EchoXTurn]]:
    """
    One single-turn conversation per request of `EchoXProcessor(audio=..., text=...)`: one clip or a list of clips
    (`None` entries are text-only), with one text for all or one per clip.
    """
    if text is not None:
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
            texts = list(text)
            if not texts:
                raise ValueError("`text` is an empty list.")
        else:
            raise ValueError("`text` must be a string or a list of strings.")
    if audio is None:
        if text is None:
            raise ValueError("EchoXProcessor needs audio, text, or both; got neither.")
        return [[EchoXTurn("user", prompt)] for prompt in texts]

    if _is_clip(audio):
        clips = [audio]
    elif isinstance(audio, (list, tuple)):
        clips = list(audio)
        if not clips:
            raise ValueError("`audio` is an empty list.")
        if any(isinstance(clip, (int, float)) and not isinstance(clip, bool) for clip in clips):
            raise ValueError(
                "`audio` looks like a list of samples: pass one clip as a numpy array (with `sampling_rate`) "
                "and a batch as a list of clips."
            )
    else:
        raise ValueError(
            f"Unsupported `audio` of type {type(audio).__name__}: expected a path, an array, a dict or a list "
            "of those."
        )

    if text is None:
        texts = [""] * len(clips)
    elif isinstance(text, str) and len(clips) > 1:
        texts = texts * len(clips)  # one instruction for every clip
    elif len(texts) != len(clips):
        raise ValueError(
            f"Got {len(clips)} audio clip(s) but {len(texts)} text prompt(s); pass one text per clip."
        )
    return [[EchoXTurn("user", prompt, clip)] for clip, prompt in zip(clips, texts)]


__all__ = ["EchoXTurn", "ROLES", "is_conversation", "read_conversation", "single_turns"]
