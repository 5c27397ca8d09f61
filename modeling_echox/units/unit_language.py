"""
The unit language: an unsupervised "word" tokenizer over deduplicated acoustic units (Zhang et al., "Leveraging Unit
Language Guidance…", ACL 2025 Findings; used by EchoX to shorten the echo decoder's output).

Each unit id becomes one private-use Unicode character, so a unit sequence is a "word" of unit characters and
SentencePiece learns multi-unit pieces over them: `model_type="unigram"` (a unigram language model with Viterbi
segmentation — the paper's n-gram-LM segmentation) or `"bpe"`. The pieces are written in EchoX's token format
`<|unit_PIECE|>`, PIECE = the unit ids joined by "_", with a leading "▁" on word-initial pieces and a leading "_" on the
others, e.g. `▁837_81` + `_194`: the released decoding rule (`EchoXUnitVocabulary.decode_text`: payloads joined with
nothing in between, then every integer) reads `[837, 81, 194]`, and so does the model's per-piece unit table.

`sentencepiece` is imported lazily, only when a unit language is trained or loaded.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..model.unit_vocabulary import WORD_MARKER, EchoXUnitVocabulary

UNIT_LANGUAGE_MODEL_FILE = "unit_language.model"
UNIT_LANGUAGE_CONFIG_FILE = "unit_language.json"

# Unit u ↦ one private-use character: U+E000 … U+F8FF (6400 units), then plane 15 (U+F0000 …, 65534 more).
_BMP_START, _BMP_SIZE = 0xE000, 6400
_PLANE15_START, _PLANE15_SIZE = 0xF0000, 65534
MAX_NUM_UNITS = _BMP_SIZE + _PLANE15_SIZE


def unit_to_char(unit: int) -> str:
    if not 0 <= unit < MAX_NUM_UNITS:
        raise ValueError(f"unit id {unit} is outside 0 … {MAX_NUM_UNITS - 1}.")
    return chr(_BMP_START + unit) if unit < _BMP_SIZE else chr(_PLANE15_START + unit - _BMP_SIZE)


def char_to_unit(char: str) -> int:
    code = ord(char)
    if _BMP_START <= code < _BMP_START + _BMP_SIZE:
        return code - _BMP_START
    if _PLANE15_START <= code < _PLANE15_START + _PLANE15_SIZE:
        return code - _PLANE15_START + _BMP_SIZE
    raise ValueError(f"{char!r} (U+{code:04X}) is not a unit character.")


def _as_unit_list(units: Any, num_units: int | None, what: str = "units") -> list[int]:
    if isinstance(units, torch.Tensor):
        array = units.detach().cpu().numpy()
    else:
        array = np.asarray(units)
    if array.size == 0:
        return []
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of unit ids, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must hold integer unit ids, got dtype {array.dtype}.")
    values = array.astype(np.int64).tolist()
    low, high = min(values), max(values)
    limit = MAX_NUM_UNITS if num_units is None else num_units
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(f"{what}: unit id {bad} is outside 0 … {limit - 1}.")
    return values


def _dedup(values: list[int]) -> list[int]:
    return [u for i, u in enumerate(values) if i == 0 or u != values[i - 1]]


class EchoXUnitLanguage:
    """
    A trained unit language: the SentencePiece model (bytes) over `num_units` unit characters.

    Unit-vocabulary index `i` (the `i`-th `<|unit_PIECE|>` token, echo-decoder id `unit_token_offset + i`) is the
    `i`-th SentencePiece piece that is not a special piece (`<unk>`); [`to_vocabulary`] lists them in that order.
    """

    def __init__(self, model_proto: bytes, num_units: int, counts: Sequence[int] | None = None):
        import sentencepiece as spm

        if not isinstance(num_units, int) or not 0 < num_units <= MAX_NUM_UNITS:
            raise ValueError(f"num_units must be an integer in 1 … {MAX_NUM_UNITS}, got {num_units!r}.")
        self.model_proto = bytes(model_proto)
        self.num_units = num_units
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        pieces, units_of, sp_to_index = [], [], np.full(self._sp.get_piece_size(), -1, dtype=np.int64)
        for sp_id in range(self._sp.get_piece_size()):
            if self._sp.is_control(sp_id) or self._sp.is_unknown(sp_id) or self._sp.is_unused(sp_id):
                continue
            piece = self._sp.id_to_piece(sp_id)
            marker = piece.startswith(WORD_MARKER)
            body = piece[1:] if marker else piece
            units = [char_to_unit(c) for c in body]
            if any(u >= num_units for u in units):
                raise ValueError(f"The SentencePiece model has a piece with units ≥ num_units={num_units}.")
            sp_to_index[sp_id] = len(pieces)
            pieces.append((WORD_MARKER if marker else "_") + "_".join(str(u) for u in units))
            units_of.append(units)
        self._sp_to_index = sp_to_index
        self.pieces = pieces
        self._units_of = units_of
        missing = set(range(num_units)) - {units[0] for units in units_of if len(units) == 1}
        if missing:
            raise ValueError(f"The SentencePiece model cannot spell units {sorted(missing)[:10]}…: every unit must "
                             "be a one-character piece (train with train_unit_language).")
        if counts is not None and len(counts) != len(pieces):
            raise ValueError(f"counts has {len(counts)} entries for {len(pieces)} pieces.")
        self.counts = list(counts) if counts is not None else None

    # -------------------------------------------------------------- properties
    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def vocab_size(self) -> int:
        """Number of unit-language tokens (`unit_vocab_size` of an EchoX config)."""
        return len(self.pieces)

    @property
    def max_piece_length(self) -> int:
        """Most units in one piece (`unit_max_piece_length` of an EchoX config)."""
        return max(len(units) for units in self._units_of)

    @property
    def model_type(self) -> str:
        return self._model_type_name()

    def _model_type_name(self) -> str:
        try:
            from sentencepiece import sentencepiece_model_pb2 as model_pb2

            proto = model_pb2.ModelProto()
            proto.ParseFromString(self.model_proto)
            return model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        except Exception:  # protobuf missing: not essential
            return "unknown"

    def __repr__(self) -> str:
        return f"EchoXUnitLanguage(num_units={self.num_units}, vocab_size={self.vocab_size})"

    def units_of(self, index: int) -> list[int]:
        return list(self._units_of[index])

    # -------------------------------------------------------------- encode / decode
    def encode(self, units: Any) -> list[int]:
        """Unit ids → unit-vocabulary indices (the whole sequence is one "word": its first piece carries "▁")."""
        values = _as_unit_list(units, self.num_units)
        if not values:
            return []
        ids = self._sp.encode("".join(unit_to_char(u) for u in values), out_type=int)
        indices = self._sp_to_index[np.asarray(ids, dtype=np.int64)]
        if (indices < 0).any():  # cannot happen for a model built by train_unit_language
            raise ValueError("The unit language produced an unknown piece for this unit sequence.")
        return indices.tolist()

    def decode(self, indices: Any) -> list[int]:
        """Unit-vocabulary indices → unit ids (inverse of [`encode`])."""
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().tolist()
        indices = list(np.asarray(indices, dtype=np.int64).reshape(-1)) if len(indices) else []
        units = []
        for index in indices:
            if not 0 <= index < len(self._units_of):
                raise ValueError(f"unit-vocabulary index {index} is outside 0 … {len(self._units_of) - 1}.")
            units.extend(self._units_of[index])
        return units

    def tokens(self, units: Any) -> list[str]:
        """Unit ids → `<|unit_PIECE|>` token strings."""
        return [f"<|unit_{self.pieces[i]}|>" for i in self.encode(units)]

    def to_vocabulary(self) -> EchoXUnitVocabulary:
        """The [`EchoXUnitVocabulary`] (`unit_vocab.txt`) of this unit language, with training counts if known."""
        return EchoXUnitVocabulary(self.pieces, self.counts)

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        model_path = os.path.join(directory, UNIT_LANGUAGE_MODEL_FILE)
        with open(model_path, "wb") as handle:
            handle.write(self.model_proto)
        config_path = os.path.join(directory, UNIT_LANGUAGE_CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(
                {"num_units": self.num_units, "vocab_size": self.vocab_size, "model_type": self.model_type,
                 "max_piece_length": self.max_piece_length, "unit_characters": "U+E000+u (u < 6400), "
                 "U+F0000+u-6400 beyond", "counts": self.counts},
                handle,
                indent=1,
            )
            handle.write("\n")
        return [model_path, config_path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "EchoXUnitLanguage":
        directory = os.fspath(directory)
        model_path = os.path.join(directory, UNIT_LANGUAGE_MODEL_FILE)
        if not os.path.isfile(model_path):
            raise OSError(f"No {UNIT_LANGUAGE_MODEL_FILE} in {directory}.")
        with open(model_path, "rb") as handle:
            proto = handle.read()
        config_path = os.path.join(directory, UNIT_LANGUAGE_CONFIG_FILE)
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        num_units = config.get("num_units")
        if num_units is None:  # every unit is a one-character piece, so the largest one tells K
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_proto=proto)
            units = [char_to_unit(c) for i in range(sp.get_piece_size())
                     if not (sp.is_control(i) or sp.is_unknown(i))
                     for c in sp.id_to_piece(i).lstrip(WORD_MARKER)]
            num_units = max(units) + 1
        return cls(proto, int(num_units), counts=config.get("counts"))


def train_unit_language(
    unit_sequences: Sequence[Any],
    vocab_size: int,
    model_type: str = "unigram",
    *,
    num_units: int | None = None,
    max_piece_length: int = 16,
    chunk_length: int = 1000,
    deduplicate: bool = True,
    hard_vocab_limit: bool = True,
    num_threads: int = 2,
    **sentencepiece_options,
) -> EchoXUnitLanguage:
    """
    Train a unit language (SentencePiece) on unit sequences, one per utterance.

    Args:
        unit_sequences: lists/arrays/tensors of unit ids, one per utterance.
        vocab_size: number of unit-language tokens wanted (`len(result)`); at least `num_units + 1` (every single
            unit and the bare "▁" are always in the vocabulary).
        model_type: `"unigram"` (unigram LM + Viterbi segmentation, the paper's n-gram-LM option) or `"bpe"`.
        num_units: K, the acoustic unit inventory (default: largest id seen + 1). Every unit 0 … K-1 is in the
            vocabulary even if it never occurs in the data.
        max_piece_length: most units per piece (SentencePiece `max_sentencepiece_length`).
        chunk_length: utterances longer than this many units are cut into chunks for training (SentencePiece limits
            sentence length); each chunk is a separate training "word".
        deduplicate: collapse repeated units first (units are expected deduplicated; a no-op if they already are).
        hard_vocab_limit: if the data cannot support `vocab_size` pieces, raise (True) or return fewer (False).
        sentencepiece_options: extra `SentencePieceTrainer.train` options.

    Why every unit is always representable: each unit is a character listed in `required_chars` (always part of the
    alphabet, seen or not), `character_coverage=1.0` keeps every seen character, `byte_fallback=False` (there are no
    byte pieces) and normalisation is `identity`. `user_defined_symbols` is not used for the units, because such
    symbols are never merged into longer pieces.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
    if isinstance(unit_sequences, (str, bytes)) or not isinstance(unit_sequences, Sequence) or not unit_sequences:
        raise ValueError("unit_sequences must be a non-empty list of unit-id sequences (one per utterance).")
    sequences = [_as_unit_list(seq, num_units, f"unit_sequences[{i}]") for i, seq in enumerate(unit_sequences)]
    if deduplicate:
        sequences = [_dedup(seq) for seq in sequences]
    sequences = [seq for seq in sequences if seq]
    if not sequences:
        raise ValueError("unit_sequences holds no units.")
    if num_units is None:
        num_units = max(max(seq) for seq in sequences) + 1
    if not isinstance(num_units, int) or not 0 < num_units <= MAX_NUM_UNITS:
        raise ValueError(f"num_units must be an integer in 1 … {MAX_NUM_UNITS}, got {num_units!r}.")
    if not isinstance(vocab_size, int) or vocab_size < num_units + 1:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least num_units + 1 = {num_units + 1}: every unit and "
                         "the word marker '▁' are pieces of their own.")
    if not isinstance(max_piece_length, int) or not 1 <= max_piece_length <= 512:
        raise ValueError(f"max_piece_length must be in 1 … 512, got {max_piece_length!r}.")
    if not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive integer, got {chunk_length!r}.")

    lines = []
    for seq in sequences:
        for start in range(0, len(seq), chunk_length):
            lines.append("".join(unit_to_char(u) for u in seq[start : start + chunk_length]))
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size + 1,  # + <unk>, which SentencePiece requires and the unit vocabulary leaves out
        character_coverage=1.0,
        byte_fallback=False,
        required_chars="".join(unit_to_char(u) for u in range(num_units)),
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_by_unicode_script=False,
        split_by_number=False,
        split_digits=False,
        max_sentencepiece_length=max_piece_length,
        max_sentence_length=4 * chunk_length + 16,  # bytes; a unit character takes at most 4 in UTF-8
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        hard_vocab_limit=hard_vocab_limit,
        num_threads=num_threads,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    options.update(sentencepiece_options)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, **options)
    except RuntimeError as error:
        limit = re.search(r"value <= (\d+)", str(error))
        hint = f" This data supports at most vocab_size={int(limit.group(1)) - 1}." if limit else ""
        raise ValueError(
            f"SentencePiece could not train a {model_type} unit language with vocab_size={vocab_size} on "
            f"{len(lines)} sequences ({error}).{hint} Lower vocab_size, give more data, or pass "
            "hard_vocab_limit=False."
        ) from error
    language = EchoXUnitLanguage(writer.getvalue(), num_units)
    counts = Counter()
    for seq in sequences:
        counts.update(language.encode(seq))
    language.counts = [counts.get(i, 0) for i in range(len(language))]
    return language


def compression_report(
    unit_language: EchoXUnitLanguage, unit_sequences: Sequence[Any], seconds: float | Sequence[float]
) -> dict:
    """
    How much the unit language shortens speech: `unit_sequences` (as given — pass the deduplicated units) are encoded;
    `seconds` is the total audio duration or one duration per sequence.
    """
    sequences = [_as_unit_list(seq, unit_language.num_units, f"unit_sequences[{i}]")
                 for i, seq in enumerate(unit_sequences)]
    if not sequences:
        raise ValueError("unit_sequences is empty.")
    total_seconds = float(sum(seconds)) if isinstance(seconds, (list, tuple, np.ndarray)) else float(seconds)
    if isinstance(seconds, (list, tuple, np.ndarray)) and len(seconds) != len(sequences):
        raise ValueError(f"seconds has {len(seconds)} entries for {len(sequences)} sequences.")
    if not total_seconds > 0:
        raise ValueError(f"seconds must be positive, got {total_seconds}.")
    total_units = sum(len(seq) for seq in sequences)
    if total_units == 0:
        raise ValueError("unit_sequences holds no units.")
    encoded = [unit_language.encode(seq) for seq in sequences]
    total_tokens = sum(len(tokens) for tokens in encoded)
    used = Counter(i for tokens in encoded for i in tokens)
    return {
        "utterances": len(sequences),
        "seconds": round(total_seconds, 3),
        "units": total_units,
        "tokens": total_tokens,
        "units_per_second": round(total_units / total_seconds, 3),
        "tokens_per_second": round(total_tokens / total_seconds, 3),
        "tokens_per_unit": round(total_tokens / total_units, 4),
        "units_per_token": round(total_units / total_tokens, 4),
        "vocab_size": unit_language.vocab_size,
        "num_units": unit_language.num_units,
        "distinct_tokens_used": len(used),
        "max_piece_length": unit_language.max_piece_length,
    }


__all__ = [
    "EchoXUnitLanguage",
    "MAX_NUM_UNITS",
    "char_to_unit",
    "compression_report",
    "train_unit_language",
    "unit_to_char",
]
