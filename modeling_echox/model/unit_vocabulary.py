"""The unit language vocabulary: unit-language tokens `<|unit_PIECE|>` and the acoustic unit ids each one stands for."""

import os
import re

import torch

UNIT_VOCAB_FILE = "unit_vocab.txt"
WORD_MARKER = "\u2581"  # SentencePiece's "▁"
_UNIT_TOKEN = re.compile(r"<\|unit_(.*?)\|>")
_INTEGER = re.compile(r"\d+")


class EchoXUnitVocabulary:
    """
    Ordered unit-language pieces. Piece `i` is the token `<|unit_{piece}|>`, whose id in the echo decoder's vocabulary
    is `unit_token_offset + i`. A sequence of unit tokens is read as the released EchoX reads it (`decode_text`): the
    pieces' payloads are concatenated and the decimal integers of the result are the acoustic unit ids, so
    `"▁837_8"` + `"1_194"` is `[837, 81, 194]`. A vocabulary whose pieces each hold whole unit ids (`splits_units` is
    False: no piece after the first of a word begins with a digit, e.g. EchoX-mini's `"▁837_81"` + `"_194"`) can
    also be read piece by piece (`to_unit_table`), with the same result.

    Stored as `unit_vocab.txt` in fairseq dictionary style (`piece count` per line; the count is informative).
    """

    def __init__(self, pieces: list[str], counts: list[int] | None = None):
        if not pieces:
            raise ValueError("EchoXUnitVocabulary: the unit vocabulary is empty.")
        if len(set(pieces)) != len(pieces):
            raise ValueError("EchoXUnitVocabulary: the unit vocabulary has duplicate pieces.")
        self.pieces = list(pieces)
        self.counts = list(counts) if counts is not None else [0] * len(pieces)
        self._index = {piece: i for i, piece in enumerate(self.pieces)}

    @classmethod
    def from_num_units(cls, num_units: int) -> "EchoXUnitVocabulary":
        """One token per acoustic unit, `<|unit_0|>` … `<|unit_{K-1}|>` (the original's fallback vocabulary)."""
        return cls([str(unit) for unit in range(num_units)])

    def __len__(self) -> int:
        return len(self.pieces)

    def token(self, index: int) -> str:
        return f"<|unit_{self.pieces[index]}|>"

    @property
    def tokens(self) -> list[str]:
        return [self.token(i) for i in range(len(self))]

    def index_of(self, piece: str) -> int:
        return self._index[piece]

    def units_of(self, index: int) -> list[int]:
        return [int(number) for number in _INTEGER.findall(self.pieces[index])]

    @property
    def splits_units(self) -> bool:
        """
        Whether the joined reading (`decode_text`) can continue a unit id across two pieces: the vocabulary writes
        word markers ("▁", which makes the original rule join payloads) and some piece that does not start a word
        begins with a digit, so after a piece ending with a digit it extends that number. Such a vocabulary can only
        be read joined, never piece by piece (`to_unit_table`). The one-unit-per-token fallback (`from_num_units`)
        writes no marker, so each token's integer is read on its own: it does not split units.
        """
        has_marker = any(WORD_MARKER in piece for piece in self.pieces)
        return has_marker and any(piece[:1].isdigit() for piece in self.pieces)

    def to_unit_table(self, num_units: int) -> torch.LongTensor:
        """
        `[len(self), max_units]` table of each piece's unit ids, padded with -1; ids ≥ `num_units` become -1. Reading
        tokens through it equals `decode_text` only for a vocabulary that does not split units (`splits_units`).
        """
        rows = [[u for u in self.units_of(i) if u < num_units] for i in range(len(self))]
        width = max(1, max(len(row) for row in rows))
        table = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return table

    @staticmethod
    def decode_text(text: str, num_units: int) -> list[int]:
        """
        The released EchoX rule on a decoded echo-decoder string: if it contains the word marker "▁", the payloads of
        its `<|unit_...|>` tokens are concatenated with nothing in between (and the rest of the string dropped); then
        every decimal integer is a unit id, and integers ≥ `num_units` are dropped.
        """
        if WORD_MARKER in text:
            text = "".join(_UNIT_TOKEN.findall(text))
        return [unit for unit in (int(number) for number in _INTEGER.findall(text)) if unit < num_units]

    def save_pretrained(self, directory: str) -> str:
        path = os.path.join(directory, UNIT_VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            for piece, count in zip(self.pieces, self.counts):
                handle.write(f"{piece} {count}\n")
        return path

    @classmethod
    def from_file(cls, path: str) -> "EchoXUnitVocabulary":
        if not os.path.isfile(path):
            raise OSError(f"Unit vocabulary file not found: {path}")
        pieces, counts = [], []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
                    raise ValueError(f"{path}:{number}: expected 'piece [count]', got {line.rstrip()!r}")
                pieces.append(fields[0])
                counts.append(int(fields[1]) if len(fields) == 2 else 0)
        return cls(pieces, counts)
