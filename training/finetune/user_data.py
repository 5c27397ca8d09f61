"""
Bring your own data: spoken questions with their transcripts and answers → an EchoX training manifest
(`training/stages/data.py`) whose audio entries are files on disk.

Accepted data:

- a `datasets.Dataset` (or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, whose `train`
  split is used) with an `audio` column — a `datasets.Audio` feature, file paths, or `{"array", "sampling_rate"}`
  dicts — and the text columns `question` or `transcript` (what is said) and `answer`;
- a JSONL file of `{"audio": path, "transcript": text, "answer": text}` lines (`question` may stand for
  `transcript`; an `id` is kept; relative paths are relative to the file).

`Audio` columns are read undecoded (`Audio(decode=False)`: the stored file path or bytes). Files and bytes are read
with soundfile, as every EchoX clip is (`modeling_echox.model.audio_io.load_audio`); `datasets`' own decoder
(torchcodec, which needs an FFmpeg and a torch it was built for) is used only for audio soundfile cannot read, where it
works. Audio that is not a readable file already (bytes, arrays, decoded clips) is written to `audio_dir`, once: a
file whose content is unchanged is not rewritten, so a re-run (or another process) reuses it and its cached encoder
states.

What each stage needs: stage I (speech → text) trains on every clip's `answer`, with the transcript as the CTC target;
stage III (echo) answers every question itself and labels the spoken answer as the recipe does
(`training/stages/stage3_echo.py`), so it needs no `answer` (one given is not used).
"""

import io
import json
import os
from typing import Any

import numpy as np
import soundfile

TRANSCRIPT_COLUMNS = ("transcript", "question")


def _load(data) -> tuple[list[dict[str, Any]], str | None, str]:
    """(rows, base directory of relative paths, what to call the data in errors)."""
    if not isinstance(data, (str, os.PathLike)):
        import datasets

        if isinstance(data, datasets.DatasetDict):
            data = _train_split(data, "the given dataset")
        if not isinstance(data, datasets.Dataset):
            raise ValueError(
                f"The data must be a datasets.Dataset, a dataset folder or a JSONL file, got {type(data).__name__}."
            )
        return _dataset_rows(data, "the given dataset"), None, "the given dataset"
    path = os.fspath(data)
    if os.path.isdir(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise ValueError(
                f"The data folder {path} is not a saved datasets.Dataset (Dataset.save_to_disk); give such a folder "
                "or a JSONL file."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _train_split(loaded, path)
        return _dataset_rows(loaded, path), None, path
    if not os.path.isfile(path):
        raise OSError(f"The data {path} does not exist.")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"Line {number} of {path} is not JSON ({error.msg}).") from None
                if not isinstance(row, dict):
                    raise ValueError(f"Line {number} of {path} is not a JSON object.")
                rows.append({**row, "_where": f"line {number} of {path}"})
    return rows, os.path.dirname(os.path.abspath(path)), path


def _train_split(splits, source: str):
    if "train" not in splits:
        raise ValueError(f"{source} holds the splits {sorted(splits)}; a 'train' split is needed.")
    return splits["train"]


def _dataset_rows(dataset, source: str) -> list[dict[str, Any]]:
    import datasets

    if "audio" in dataset.column_names and isinstance(dataset.features["audio"], datasets.Audio):
        dataset = dataset.cast_column("audio", datasets.Audio(decode=False))  # path / bytes, never torchcodec here
    return [{**row, "_where": f"row {index} of {source}"} for index, row in enumerate(dataset)]


def _decode_with_datasets(value: dict) -> tuple[np.ndarray, int]:
    """Samples `[frames, channels]` and rate of an `Audio` value by `datasets`' decoder (torchcodec), or OSError."""
    import datasets

    if not datasets.config.TORCHCODEC_AVAILABLE:
        raise OSError("datasets' audio decoder (torchcodec) is not installed")
    try:
        samples = datasets.Audio().decode_example(value).get_all_samples()
    except Exception as error:  # a torchcodec built for another torch or FFmpeg fails in many ways
        raise OSError(f"datasets' audio decoder failed: {' '.join(str(error).split())[:200]}") from None
    return samples.data.numpy().T, int(samples.sample_rate)


def _wav_bytes(samples, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(samples, dtype=np.float32), int(rate), format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _store(content: bytes, path: str) -> str:
    """Write `content` to `path` unless it already holds exactly that (atomic; keeps the mtime of an unchanged file)."""
    if os.path.isfile(path) and os.path.getsize(path) == len(content):
        with open(path, "rb") as handle:
            if handle.read() == content:
                return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(content)
    os.replace(tmp, path)
    return path


def _readable(path: str) -> bool:
    try:
        soundfile.info(path)
        return True
    except (RuntimeError, soundfile.LibsndfileError):
        return False


def _audio_file(value, base_dir: str | None, audio_dir: str, name: str, where: str) -> str:
    """A readable audio file for one row's `audio` value (see the module docstring)."""
    if isinstance(value, (str, os.PathLike)):
        value = {"path": os.fspath(value), "bytes": None}
    if not isinstance(value, dict):
        raise ValueError(
            f"{where}: 'audio' must be a path, a datasets Audio value or an array dict, not {type(value).__name__}."
        )
    if value.get("array") is not None:
        if not value.get("sampling_rate"):
            raise ValueError(f"{where}: an audio array needs its 'sampling_rate'.")
        return _store(_wav_bytes(value["array"], value["sampling_rate"]), os.path.join(audio_dir, f"{name}.wav"))
    path, content = value.get("path"), value.get("bytes")
    if content:
        if _readable(io.BytesIO(content)):
            extension = os.path.splitext(path or "")[1] or ".wav"
            return _store(content, os.path.join(audio_dir, f"{name}{extension}"))
        try:
            samples, rate = _decode_with_datasets({"path": path, "bytes": content})
        except OSError as error:
            raise ValueError(f"{where}: its audio bytes are in a format soundfile cannot read, and {error}.") from None
        return _store(_wav_bytes(samples, rate), os.path.join(audio_dir, f"{name}.wav"))
    if not path:
        raise ValueError(f"{where} has no audio (neither a path nor bytes).")
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise OSError(f"{where}: the audio file {path} does not exist.")
    if _readable(path):
        return path
    try:
        samples, rate = _decode_with_datasets({"path": path, "bytes": None})
    except OSError as error:
        raise ValueError(f"{where}: the audio file {path} is in a format soundfile cannot read, and {error}.") from None
    return _store(_wav_bytes(samples, rate), os.path.join(audio_dir, f"{name}.wav"))


def _text(row: dict, columns: tuple[str, ...], where: str) -> str:
    """The first of `columns` the row has, as a non-empty string."""
    column = next(c for c in columns if c in row)
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} has an empty or non-text '{column}'.")
    return value.strip()


def user_records(data, audio_dir: str, stage: int = 1) -> list[dict[str, Any]]:
    """
    The examples of `data` (see the module docstring) as manifest records `{"id", "audio", "transcript", "response"}`
    with absolute audio paths; bytes and arrays are written to `audio_dir`. Stage I needs a transcript and an answer
    per clip; stage III only the audio (a transcript is kept, the response is left empty). Raises a ValueError (an OSError for a
    missing file) naming the row and the problem: an empty dataset, a missing column, a missing or unreadable audio
    file, an empty text.
    """
    if stage not in (1, 3):
        raise ValueError(f"stage must be 1 or 3, got {stage!r}.")
    rows, base_dir, source = _load(data)
    if not rows:
        raise ValueError(f"{source} holds no examples.")
    jsonl = base_dir is not None
    present = set().union(*(set(row) for row in rows)) - {"_where"}
    needed = [("audio",)] + ([TRANSCRIPT_COLUMNS, ("answer",)] if stage == 1 else [])
    for columns in needed:
        if not present.intersection(columns):
            alternatives = " or ".join(repr(c) for c in columns)
            kind = "key" if jsonl else "column"
            raise ValueError(f"{source} has no {alternatives} {kind} (it has {sorted(present)}).")
    records = []
    for index, row in enumerate(rows):
        where = row["_where"]
        for columns in needed:  # a JSONL line must carry every key itself
            if not set(row).intersection(columns):
                raise ValueError(f"{where} has no {' or '.join(repr(c) for c in columns)}.")
        record = {
            "id": str(row["id"]) if row.get("id") is not None else f"example-{index}",
            "audio": _audio_file(row.get("audio"), base_dir, audio_dir, f"example-{index:06d}", where),
            "transcript": "",
        }
        column = next((c for c in TRANSCRIPT_COLUMNS if row.get(c) is not None), None)
        if column is not None or stage == 1:
            record["transcript"] = _text(row, (column,) if column else TRANSCRIPT_COLUMNS, where)
        # stage III answers every question itself (the manifest still has the field)
        record["response"] = _text(row, ("answer",), where) if stage == 1 else ""
        records.append(record)
    return records
