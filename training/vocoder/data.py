"""Vocoder training data: a JSONL manifest of `{"audio": path, "units": [...], "durations": [...]}` items (units are
deduplicated 50 Hz units, durations count 20 ms frames; optional `"text"` and `"speaker"`), random segments of N frames
with the matching `N × hop_length` waveform samples, and a padding collator.

Relative audio paths are resolved against the manifest's folder.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from modeling_echox.model.audio_io import load_audio


def read_manifest(path: str | os.PathLike, num_units: int | None = None) -> list[dict[str, Any]]:
    """Reads and validates a manifest JSONL; returns the items with absolute `"audio"` paths."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error}).") from error
            where = f"{path}:{line_number}"
            for key in ("audio", "units", "durations"):
                if key not in item:
                    raise ValueError(f"{where}: missing {key!r}.")
            units, durations = item["units"], item["durations"]
            if not units or len(units) != len(durations):
                raise ValueError(f"{where}: units and durations must be non-empty lists of the same length.")
            if min(durations) < 1:
                raise ValueError(f"{where}: every duration must be ≥ 1 frame.")
            if min(units) < 0 or (num_units is not None and max(units) >= num_units):
                raise ValueError(f"{where}: unit ids must be in [0, {num_units}).")
            item = dict(item)
            if not os.path.isabs(item["audio"]):
                item["audio"] = os.path.join(base, item["audio"])
            items.append(item)
    if not items:
        raise ValueError(f"{path}: empty manifest.")
    return items


def segment_units(
    durations: np.ndarray, start: int, frames: int
) -> tuple[int, int, np.ndarray]:
    """
    Units overlapping frames `[start, start + frames)`: returns `(first, stop, trimmed)` where `units[first:stop]` are
    those units and `trimmed` their durations clipped to the segment (summing to the segment's frames).
    """
    ends = np.cumsum(durations)
    starts = ends - durations
    end = start + frames
    first = int(np.searchsorted(ends, start, side="right"))
    stop = int(np.searchsorted(starts, end, side="left"))
    trimmed = np.minimum(ends[first:stop], end) - np.maximum(starts[first:stop], start)
    return first, stop, trimmed.astype(np.int64)


class VocoderSegmentDataset(Dataset):
    """
    `(units, durations, waveform segment)` items.

    Each `__getitem__` picks a random window of `segment_frames` frames (the whole utterance if it is shorter, or if
    `segment_frames` is `None`), the units overlapping it with their durations trimmed to the window
    (`durations`, sums to the window's frames; used to expand the units), their full durations
    (`target_durations`, the duration predictor's targets) and the `frames × hop_length` matching waveform samples
    (zero-padded if the file is a little short).

    Randomness is a pure function of `(seed, epoch, index)`: the item order is a permutation drawn per epoch (call
    `set_data_epoch`; `shuffle=False` keeps the manifest order) and so is each window, so a resumed run sees the
    same data.
    """

    def __init__(
        self,
        items: list[dict[str, Any]],
        segment_frames: int | None,
        hop_length: int = 320,
        sampling_rate: int = 16000,
        seed: int = 0,
        shuffle: bool = True,
        cache_audio: bool = False,
    ):
        if segment_frames is not None and segment_frames < 1:
            raise ValueError("segment_frames must be ≥ 1 or None.")
        self.items = items
        self.segment_frames = segment_frames
        self.hop_length = hop_length
        self.sampling_rate = sampling_rate
        self.seed = seed
        self.shuffle = shuffle
        self.cache_audio = cache_audio
        self._cache: dict[str, np.ndarray] = {}
        self._file_rates: dict[str, int] = {}
        self.epoch = 0

    def set_data_epoch(self, epoch: int):
        """Selects the epoch's item order and windows. (Not named `set_epoch`: accelerate's data loader would call that
        with its own iteration count, which restarts at 0 on resume.)"""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _item_index(self, index: int) -> int:
        if not self.shuffle:
            return index
        return int(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))[index])

    def _read(self, path: str, start: int, stop: int) -> np.ndarray:
        """Samples `[start, stop)` of a file at `self.sampling_rate`, mono float32, zero-padded past its end."""
        if path in self._cache:
            audio = self._cache[path]
        else:
            rate = self._file_rates.get(path)
            if rate is None:
                rate = self._file_rates[path] = sf.info(path).samplerate
            if rate == self.sampling_rate and not self.cache_audio:
                audio = sf.read(path, start=start, stop=stop, dtype="float32", always_2d=True)[0].mean(axis=1)
                start, stop = 0, stop - start
            else:
                audio = load_audio(path, target_rate=self.sampling_rate, max_seconds=None)
                if self.cache_audio:
                    self._cache[path] = audio
        segment = audio[start:stop]
        if len(segment) < stop - start:
            segment = np.pad(segment, (0, stop - start - len(segment)))
        return np.ascontiguousarray(segment, dtype=np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_index = self._item_index(index)
        item = self.items[item_index]
        durations = np.asarray(item["durations"], dtype=np.int64)
        units = np.asarray(item["units"], dtype=np.int64)
        total = int(durations.sum())
        if self.segment_frames is None or total <= self.segment_frames:
            start, frames = 0, total
        else:
            rng = np.random.default_rng([self.seed, self.epoch, item_index, 1])
            start, frames = int(rng.integers(0, total - self.segment_frames + 1)), self.segment_frames
        first, stop, trimmed = segment_units(durations, start, frames)
        waveform = self._read(item["audio"], start * self.hop_length, (start + frames) * self.hop_length)
        example = {
            "input_ids": torch.from_numpy(units[first:stop]),
            "durations": torch.from_numpy(trimmed),
            "target_durations": torch.from_numpy(durations[first:stop]),
            "waveform": torch.from_numpy(waveform),
            "index": item_index,
        }
        if "speaker" in item:
            example["speaker_id"] = int(item["speaker"])
        return example


@dataclass
class VocoderCollator:
    """Right-pads a list of dataset examples into a batch (unit id 0, duration 0 and zero samples at padding)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch_size = len(examples)
        max_units = max(len(x["input_ids"]) for x in examples)
        max_samples = max(len(x["waveform"]) for x in examples)
        input_ids = torch.zeros(batch_size, max_units, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, max_units, dtype=torch.long)
        durations = torch.zeros(batch_size, max_units, dtype=torch.long)
        target_durations = torch.zeros(batch_size, max_units, dtype=torch.long)
        waveform = torch.zeros(batch_size, max_samples)
        for i, example in enumerate(examples):
            n, s = len(example["input_ids"]), len(example["waveform"])
            input_ids[i, :n] = example["input_ids"]
            attention_mask[i, :n] = 1
            durations[i, :n] = example["durations"]
            target_durations[i, :n] = example["target_durations"]
            waveform[i, :s] = example["waveform"]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "durations": durations,
            "target_durations": target_durations,
            "waveform": waveform,
            "waveform_lengths": torch.tensor([len(x["waveform"]) for x in examples]),
            "index": torch.tensor([x["index"] for x in examples]),
        }
        if all("speaker_id" in x for x in examples):
            batch["speaker_id"] = torch.tensor([x["speaker_id"] for x in examples])
        return batch


__all__ = ["VocoderCollator", "VocoderSegmentDataset", "read_manifest", "segment_units"]
