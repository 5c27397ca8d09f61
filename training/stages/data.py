"""
Spoken dialogue data for the three EchoX training stages: JSONL manifests → a `datasets.Dataset` → batches that are
exactly what `EchoXForSpeechToSpeech.forward` needs.

Manifest: one JSON object per line (single-turn; multi-turn dialogues are not supported yet — flatten them into one
example per assistant turn with the earlier turns in `prompt` if you need them):

    {"id": "optional name",
     "audio": "path/to/question.wav" | null,   # relative paths: relative to the manifest's directory
     "transcript": "what the speaker said",     # CTC targets of stage I (optional; empty → no CTC target)
     "prompt": "optional user text after the audio",
     "response": "the assistant's answer",
     "response_ids": [optional LLM ids of the answer without the final eot; overrides `response`],
     "units": [unit-language indices of the whole spoken answer],             # stage II / III targets
     "segments": [["segment text", [unit-language indices]], ...],           # optional, segment-wise targets
     "segment_lengths": [response tokens per segment, ...]}                   # optional, with `response_ids`

Audio is never decoded through `datasets.Audio` (in `datasets` 5 that feature decodes with torchcodec, which needs an
FFmpeg build that is not installed everywhere): the `audio` column stays a plain path string and the collator reads
it with `modeling_echox.model.audio_io.load_audio` (soundfile + scipy resampling), or takes the frozen speech encoder's
outputs from an [`EncoderStateCache`].

Label layout (as the original `preprocess`): `input_ids = prompt + response + [eot]` where the response ids are
`tokenizer(response)` (BOS first, as the released model learnt to emit it), `labels = -100` on every prompt position
and the response ids + the final eot as targets; right padding with the text pad id (`labels` -100,
`attention_mask` 0).
"""

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import soundfile
import torch

from modeling_echox.model.audio_io import load_audio

IGNORE_INDEX = -100
STAGES = ("s2t", "t2c", "echo")
FIELDS = ("id", "audio", "transcript", "prompt", "response", "response_ids", "units", "segment_texts",
          "segment_units", "segment_lengths")


# ------------------------------------------------------------------------------------------------------- manifests
def normalize_record(
    record: dict[str, Any], base_dir: str | None = None, index: int = 0, default_id: str | None = None
) -> dict[str, Any]:
    """One manifest line → the fixed schema of the dataset (every field present, `segments` split into two columns)."""
    if "turns" in record:
        raise ValueError("Multi-turn records ('turns') are not supported yet; use one single-turn example per answer.")
    if "response" not in record and "response_ids" not in record:
        raise ValueError(f"Manifest record {index} has neither 'response' nor 'response_ids'.")
    audio = record.get("audio")
    if isinstance(audio, dict):
        audio = audio.get("path")
    if audio is not None:
        audio = os.fspath(audio)
        if base_dir is not None and not os.path.isabs(audio):
            audio = os.path.normpath(os.path.join(base_dir, audio))
    segments = record.get("segments") or []
    for segment in segments:
        if not (isinstance(segment, (list, tuple)) and len(segment) == 2 and isinstance(segment[0], str)):
            raise ValueError(f"Manifest record {index}: every segment must be [text, [unit indices]], got {segment!r}.")
    return {
        "id": str(record.get("id", default_id if default_id is not None else index)),
        "audio": audio,
        "transcript": record.get("transcript") or "",
        "prompt": record.get("prompt") or "",
        "response": record.get("response") or "",
        "response_ids": [int(i) for i in record.get("response_ids") or []],
        "units": [int(u) for u in record.get("units") or []],
        "segment_texts": [segment[0] for segment in segments],
        "segment_units": [[int(u) for u in segment[1]] for segment in segments],
        "segment_lengths": [int(n) for n in record.get("segment_lengths") or []],
    }


def read_manifest(path: str) -> list[dict[str, Any]]:
    """Read and normalize a JSONL manifest (relative audio paths resolved against the manifest's directory)."""
    base_dir = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                index = len(records)
                name = f"{os.path.basename(path)}:{index}"
                records.append(normalize_record(json.loads(line), base_dir, index, default_id=name))
    if not records:
        raise ValueError(f"Manifest {path} holds no records.")
    return records


def load_dialogue_dataset(paths: str | Sequence[str]):
    """
    One or more JSONL manifests → a `datasets.Dataset` with the columns of `FIELDS` (audio as a path string; never a
    `datasets.Audio` feature, see the module docstring).
    """
    import datasets

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records = [record for path in paths for record in read_manifest(os.fspath(path))]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "audio": datasets.Value("string"),
            "transcript": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "response_ids": datasets.List(datasets.Value("int64")),
            "units": datasets.List(datasets.Value("int64")),
            "segment_texts": datasets.List(datasets.Value("string")),
            "segment_units": datasets.List(datasets.List(datasets.Value("int64"))),
            "segment_lengths": datasets.List(datasets.Value("int64")),
        }
    )
    return datasets.Dataset.from_list(records, features=features)


def write_manifest(path: str, records: Sequence[dict[str, Any]]) -> str:
    """Write records (manifest format) as JSONL, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- encoder-state cache
def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class EncoderStateCache:
    """
    On-disk cache of the frozen speech encoder's outputs `[frames, d_model]` per audio file, keyed by the file's
    absolute path + size + mtime, the feature extractor's settings, the model's `encoder_window` and a hash of the
    encoder weights (so a different or fine-tuned encoder never reuses stale states). Files are written atomically
    (safe with several processes).

    Only valid while the encoder is frozen: the collator refuses to use it when `audio_tower` has trainable weights.
    """

    def __init__(self, directory: str, model, feature_extractor, dtype: torch.dtype | None = None):
        self.directory = directory
        self.model = model
        self.feature_extractor = feature_extractor
        self.dtype = dtype
        os.makedirs(directory, exist_ok=True)
        extractor = json.dumps(feature_extractor.to_dict(), sort_keys=True, default=str)
        self.model_key = hashlib.sha256(
            (module_fingerprint(model.audio_tower) + extractor + str(dtype) + model.config.encoder_window).encode()
        ).hexdigest()[:16]
        self.hits = self.misses = 0

    def key(self, path: str) -> str:
        path = os.path.abspath(path)
        stat = os.stat(path)
        raw = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{self.model_key}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def file(self, path: str) -> str:
        key = self.key(path)
        return os.path.join(self.directory, key[:2], f"{key}.pt")

    @torch.no_grad()
    def get(self, paths: Sequence[str], max_seconds: float = 30.0) -> torch.Tensor:
        """Encoder states `[len(paths), frames, d_model]`, computed (and stored) for the files not cached yet."""
        if any(p.requires_grad for p in self.model.audio_tower.parameters()):
            raise ValueError("The encoder-state cache needs a frozen audio_tower (it has trainable weights).")
        out: list[torch.Tensor | None] = [None] * len(paths)
        missing = []
        for index, path in enumerate(paths):
            file = self.file(path)
            if os.path.exists(file):
                try:
                    out[index] = torch.load(file, map_location="cpu", weights_only=True)
                    self.hits += 1
                    continue
                except Exception:  # a truncated file from a killed writer: recompute it
                    pass
            missing.append(index)
        if missing:
            self.misses += len(missing)
            features = extract_features(self.feature_extractor, [paths[i] for i in missing], max_seconds)
            tower = self.model.audio_tower
            device = next(tower.parameters()).device
            states = self.model.encode_audio(features.to(device)).cpu()
            if self.dtype is not None:
                states = states.to(self.dtype)
            for row, index in enumerate(missing):
                file = self.file(paths[index])
                os.makedirs(os.path.dirname(file), exist_ok=True)
                tmp = f"{file}.tmp{os.getpid()}"
                torch.save(states[row].clone(), tmp)
                os.replace(tmp, file)
                out[index] = states[row]
        return torch.stack(out)

    def warm(self, paths: Sequence[str], batch_size: int = 8) -> int:
        """Compute the states of every file not cached yet; returns how many were computed."""
        before = self.misses
        unique = sorted(set(p for p in paths if p))
        for start in range(0, len(unique), batch_size):
            self.get(unique[start : start + batch_size])
        return self.misses - before


def extract_features(feature_extractor, paths: Sequence[str], max_seconds: float = 30.0) -> torch.Tensor:
    """Audio files → Whisper log-mel features `[N, n_mels, frames]` (30 s window)."""
    waves = [
        load_audio(path, target_rate=feature_extractor.sampling_rate, max_seconds=max_seconds) for path in paths
    ]
    features = feature_extractor(
        waves,
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        return_attention_mask=False,
        return_tensors="np",
    )["input_features"]
    return torch.from_numpy(np.asarray(features, dtype=np.float32))


# -------------------------------------------------------------------------------------------------------- collator
ENCODER_HOP_SAMPLES = 320  # 16 kHz samples per Whisper encoder frame (mel hop 160 × conv stride 2)


def _samples_at_16k(path: str) -> int:
    info = soundfile.info(path)
    return int(round(info.frames * 16000 / info.samplerate))


def _pad(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.LongTensor:
    width = max([len(r) for r in rows] + [0]) if width is None else width
    out = torch.full((len(rows), max(width, 1) if rows else 0), value, dtype=torch.long)
    for index, row in enumerate(rows):
        if len(row):
            out[index, : len(row)] = torch.tensor(list(row)[:width], dtype=torch.long)
    return out


def _pad3(rows: Sequence[Sequence[Sequence[int]]], value: int) -> torch.LongTensor:
    segments = max([len(r) for r in rows] + [1])
    width = max([len(s) for r in rows for s in r] + [1])
    out = torch.full((len(rows), segments, width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        for j, segment in enumerate(row):
            if len(segment):
                out[i, j, : len(segment)] = torch.tensor(list(segment), dtype=torch.long)
    return out


class EchoXDataCollator:
    """
    Builds EchoX training batches from dataset rows (see the module docstring).

    Args:
        processor: an `EchoXProcessor` (prompt ids, tokenizer, feature extractor).
        config: the model's `EchoXConfig` (pad / eot / unit offset / echo eos ids).
        stage: `"s2t"` (stage I: `labels` + `ctc_labels`), `"t2c"` (stage II: `echo_text_ids` + `unit_labels`, no
            audio), `"echo"` (stage III: `labels` + `unit_labels` (+ `echo_segment_lengths` in segment-wise mode)).
        encoder_cache: an [`EncoderStateCache`]; batches then carry `encoder_states` instead of `input_features`.
        segment_wise: stage III: use the records' segments (`echo_segment_lengths`) rather than the whole response.
        with_ctc: add `ctc_labels` (transcript ids, no BOS) for the clips (default: stage I only; stage III in whole-
            response mode adds them so that the S2T loss is CE + 0.3 · CTC as in the paper).
        max_ctc_length: CTC targets are cut to this many ids (the original padded them to 300).
        max_response_tokens: responses are cut to this many ids (+ the eot).
    """

    def __init__(
        self,
        processor,
        config,
        stage: str = "s2t",
        encoder_cache: EncoderStateCache | None = None,
        segment_wise: bool = False,
        with_ctc: bool | None = None,
        max_ctc_length: int = 300,
        max_response_tokens: int = 512,
    ):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.stage = stage
        self.encoder_cache = encoder_cache
        self.segment_wise = segment_wise
        self.with_ctc = stage == "s2t" if with_ctc is None else with_ctc
        self.max_ctc_length = max_ctc_length
        self.max_response_tokens = max_response_tokens
        eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        if eot is None or eot == self.tokenizer.unk_token_id:
            eot = self.tokenizer.eos_token_id
        self.eot_id = eot
        self.pad_id = config.text_pad_token_id if config.text_pad_token_id is not None else eot

    # ---- pieces
    def response_pieces(self, example) -> tuple[list[int], list[int]]:
        """(response ids without the final eot, response tokens per segment — empty when not segment-wise)."""
        if example.get("response_ids"):
            ids = list(example["response_ids"])
            lengths = list(example.get("segment_lengths") or [])
            return ids[: self.max_response_tokens], lengths
        texts = example.get("segment_texts") or []
        if texts and (self.segment_wise or self.stage == "t2c"):
            ids, lengths = [], []
            for index, text in enumerate(texts):
                piece = self.tokenizer(text, add_special_tokens=index == 0).input_ids
                ids += piece
                lengths.append(len(piece))
            return ids[: self.max_response_tokens], lengths
        return self.tokenizer(example["response"]).input_ids[: self.max_response_tokens], []

    def unit_targets(self, example, num_segments: int) -> list[list[int]]:
        """Joint-vocabulary unit targets per segment, each ending with the echo eos."""
        offset, eos = self.config.unit_token_offset, self.config.echo_config.unit_eos_token_id
        if num_segments and example.get("segment_units"):
            groups = example["segment_units"]
        else:
            groups = [example.get("units") or []]
        for group in groups:
            if any(not 0 <= u < self.config.unit_vocab_size for u in group):
                raise ValueError(
                    f"Example {example.get('id')}: unit-language indices must be in [0, {self.config.unit_vocab_size})."
                )
        return [[offset + u for u in group] + [eos] for group in groups]

    def audio_inputs(self, paths: list[str]) -> dict[str, torch.Tensor]:
        if not paths:
            return {}
        if self.encoder_cache is not None:
            batch = {"encoder_states": self.encoder_cache.get(paths, self.processor.max_audio_seconds)}
            if self.config.crop_audio_padding:  # the model reads these off features itself, not off cached states
                frames = [math.ceil(_samples_at_16k(path) / ENCODER_HOP_SAMPLES) for path in paths]
                batch["audio_frame_lengths"] = torch.tensor(frames, dtype=torch.long)
            return batch
        return {"input_features": extract_features(self.processor.feature_extractor, paths, self.processor.max_audio_seconds)}

    # ---- batches
    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.stage == "t2c":
            return self._text_to_codec(examples)
        rows, labels, paths, ctc, units, lengths = [], [], [], [], [], []
        for example in examples:
            has_audio = bool(example.get("audio"))
            prompt = self.processor.build_prompt_ids(example.get("prompt") or "", has_audio=has_audio)
            response, segment_lengths = self.response_pieces(example)
            response = response + [self.eot_id]
            rows.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
            if has_audio:
                paths.append(example["audio"])
                transcript = example.get("transcript") or ""
                ctc.append(self.tokenizer(transcript, add_special_tokens=False).input_ids[: self.max_ctc_length])
            if self.stage == "echo":
                if not self.segment_wise:
                    segment_lengths = []
                units.append(self.unit_targets(example, len(segment_lengths)))
                lengths.append(segment_lengths)
        batch = {
            "input_ids": _pad(rows, self.pad_id),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }
        batch.update(self.audio_inputs(paths))
        if self.with_ctc and paths:
            batch["ctc_labels"] = _pad(ctc, IGNORE_INDEX)
        if self.stage == "echo":
            batch["unit_labels"] = _pad3(units, IGNORE_INDEX)
            if self.segment_wise:
                if any(not row for row in lengths):
                    raise ValueError("segment_wise needs segments (segment_texts or segment_lengths) in every example.")
                batch["echo_segment_lengths"] = _pad(lengths, 0)
        return batch

    def _text_to_codec(self, examples) -> dict[str, torch.Tensor]:
        texts, units = [], []
        for example in examples:
            response, segment_lengths = self.response_pieces(example)
            if segment_lengths:
                spans, start = [], 0
                for length in segment_lengths:
                    spans.append(response[start : start + length])
                    start += length
            else:
                spans = [response]
            targets = self.unit_targets(example, len(segment_lengths))
            if len(targets) != len(spans):
                raise ValueError(f"Example {example.get('id')}: {len(spans)} text segments but {len(targets)} unit targets.")
            texts.append(spans)
            units.append(targets)
        return {"echo_text_ids": _pad3(texts, IGNORE_INDEX), "unit_labels": _pad3(units, IGNORE_INDEX)}


__all__ = [
    "EchoXDataCollator",
    "EncoderStateCache",
    "extract_features",
    "load_dialogue_dataset",
    "normalize_record",
    "read_manifest",
    "write_manifest",
]
