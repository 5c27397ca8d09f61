"""
Convert locally stored spoken-QA benchmarks (Llama Questions, spoken Web Questions, spoken TriviaQA, ...) into the
manifest that `echox eval` reads (see `modeling_echox.evaluation.spoken_qa.read_eval_manifest`): one JSON line per question,

    {"id": str, "audio": "audio/<id>.wav", "answers": [str, ...], "question": str (when the data has one)}

with every clip written as a 16 kHz mono float WAV under `OUT/audio/` (paths in the manifest are relative to it).

Inputs (one or more, rows are concatenated in order):
- a `.parquet` file (e.g. a dataset exported with an `Audio` column), read with pyarrow into a `datasets.Dataset`;
- a `.arrow` file, or a directory written by `datasets.Dataset.save_to_disk` (a `DatasetDict` directory works
  when it holds a single split; otherwise point at the split's sub-directory);
- a `.jsonl` / `.json` file (JSON lines, a JSON list of rows, or `{"data": [rows]}`).

The audio column may be a `datasets.Audio` feature (cast to `Audio(decode=False)`: audio is never decoded through
`datasets`, which would need torchcodec / FFmpeg), a struct `{"bytes", "path"}` or `{"array", "sampling_rate"}`,
or a plain path (relative paths are taken from the data file's directory). Bytes are decoded with soundfile.

Answers: a string becomes `[string]`, a list stays a list, a TriviaQA-style dict `{"value", "aliases", ...}` becomes
its value followed by its aliases; duplicates (ignoring case and spacing) are dropped.

    python -m training.data.qa_benchmarks --data llama_questions/test.parquet --out build/eval/llama_questions
    echox eval --model DIR --manifest build/eval/llama_questions/llama_questions.jsonl --out result.json

Options: `--name` (manifest name and default id prefix, default `llama_questions`), `--question-column`,
`--answer-column`, `--audio-column`, `--id-column` (defaults `question`, `answer`, `audio`, `id`; the question and id
columns are optional unless given explicitly), `--limit N` (first N rows only).
"""

import argparse
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import soundfile as sf

from modeling_echox.model.audio_io import DEFAULT_SAMPLING_RATE, load_audio

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")


# ---------------------------------------------------------------------------------------------------------- loading


def _load_dataset(path: str):
    """A `datasets.Dataset` for a parquet / arrow file or a `save_to_disk` directory, audio left undecoded."""
    import datasets

    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise ValueError(
                    f"{path} holds a DatasetDict with splits {sorted(loaded)}; pass the directory of one split "
                    f"(e.g. {os.path.join(path, sorted(loaded)[0])})."
                )
            loaded = next(iter(loaded.values()))
        return loaded
    if path.endswith(".arrow"):
        return datasets.Dataset.from_file(path)
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    # Reading the table directly keeps the `datasets` features (schema metadata) without touching the datasets cache.
    return datasets.Dataset(InMemoryTable(pq.read_table(path)))


def _undecoded(dataset, audio_column: str):
    """`dataset` with an `Audio` feature column cast to `Audio(decode=False)` (rows give `{"bytes", "path"}`)."""
    import datasets

    feature = dataset.features.get(audio_column)
    if isinstance(feature, datasets.Audio) and feature.decode:
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    return dataset


def _read_json_rows(path: str) -> list[dict]:
    """Rows of a JSON-lines file, a JSON list of objects, or a JSON object `{"data": [objects]}`."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    rows = None
    if path.endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # maybe JSON lines in a .json file
        if isinstance(whole, list):
            rows = whole
        elif isinstance(whole, Mapping) and isinstance(whole.get("data"), list):
            rows = whole["data"]
        elif whole is not None:
            raise ValueError(
                f"{path}: expected a JSON list of rows (or {{'data': [rows]}}), got {type(whole).__name__}."
            )
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
    for number, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{path}: row {number} is a {type(row).__name__}, expected a JSON object.")
    return rows


def load_rows(path: str, columns: Sequence[str]) -> tuple[list[str], Sequence[dict]]:
    """(available column names, sized iterable of row dicts) of one data file / directory; `columns[0]` is audio."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Data path not found: {path}")
    if not os.path.isdir(path) and not path.endswith(DATA_SUFFIXES):
        raise ValueError(f"{path}: unsupported data file; expected one of {', '.join(DATA_SUFFIXES)} or a directory.")
    if path.endswith((".jsonl", ".json")) and not os.path.isdir(path):
        rows = _read_json_rows(path)
        available = list(dict.fromkeys(key for row in rows for key in row))
        return available, rows
    dataset = _load_dataset(path)
    available = list(dataset.column_names)
    audio_column = columns[0]
    if audio_column in available:
        dataset = _undecoded(dataset, audio_column)
    keep = [column for column in columns if column in available]
    return available, dataset.select_columns(keep)


# ------------------------------------------------------------------------------------------------ answers and audio


def normalize_answers(value: Any, where: str) -> list[str]:
    """Gold answers as a non-empty list of distinct non-empty strings (see the module docstring)."""
    if isinstance(value, Mapping):
        if "value" not in value and "aliases" not in value:
            raise ValueError(f"{where}: an answer dict needs 'value' and/or 'aliases' keys, got {sorted(value)}.")
        items = [value.get("value"), *(value.get("aliases") or [])]
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        items = [value]
    answers, seen = [], set()
    for item in items:
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, (int, float, np.integer, np.floating)):
            item = str(item)
        if not isinstance(item, str):
            raise ValueError(f"{where}: answers must be strings, got {type(item).__name__} ({item!r}).")
        text = " ".join(item.split())
        key = text.casefold()
        if text and key not in seen:
            seen.add(key)
            answers.append(text)
    if not answers:
        raise ValueError(f"{where}: the answer is empty ({value!r}).")
    return answers


def _decode_bytes(data: bytes, where: str) -> tuple[np.ndarray, int]:
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError on undecodable bytes
        raise ValueError(f"{where}: could not decode the audio bytes ({len(data)} bytes): {error}") from None
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32), int(rate)  # [samples, channels] → mono


def _read_path(path: str, base_dir: str, where: str) -> tuple[np.ndarray, int]:
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if not os.path.isfile(full):
        raise ValueError(f"{where}: audio file not found: {full}")
    try:
        samples, rate = sf.read(full, dtype="float32", always_2d=True)
    except Exception as error:
        raise ValueError(f"{where}: could not read audio file {full}: {error}") from None
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32), int(rate)  # [samples, channels] → mono


def decode_audio(value: Any, base_dir: str, where: str, target_rate: int = DEFAULT_SAMPLING_RATE) -> np.ndarray:
    """One row's audio (bytes / path / array struct, or a path string) → 1-D float32 mono at `target_rate` Hz."""
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            samples, rate = _decode_bytes(value["bytes"], where)
        elif value.get("array") is not None:
            if value.get("sampling_rate") is None:
                raise ValueError(f"{where}: the audio has an 'array' but no 'sampling_rate'.")
            samples, rate = np.asarray(value["array"]), value["sampling_rate"]
        elif value.get("path"):
            samples, rate = _read_path(value["path"], base_dir, where)
        else:
            raise ValueError(f"{where}: the audio has no 'bytes', 'array' or 'path' (keys {sorted(value)}).")
    elif isinstance(value, (bytes, bytearray)):
        samples, rate = _decode_bytes(bytes(value), where)
    elif isinstance(value, (str, os.PathLike)) and os.fspath(value):
        samples, rate = _read_path(os.fspath(value), base_dir, where)
    else:
        raise ValueError(f"{where}: unsupported audio value of type {type(value).__name__}.")
    try:
        return load_audio(samples, sampling_rate=rate, target_rate=target_rate, max_seconds=None)
    except (ValueError, TypeError, OSError) as error:
        raise ValueError(f"{where}: {error}") from None


def _file_stem(identifier: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", identifier).strip("._")
    return stem or "item"


# ----------------------------------------------------------------------------------------------------- conversion


def convert(
    data: Sequence[str],
    out_dir: str,
    name: str = "llama_questions",
    question_column: str | None = None,
    answer_column: str = "answer",
    audio_column: str = "audio",
    id_column: str | None = None,
    limit: int | None = None,
) -> dict:
    """
    Write `out_dir/<name>.jsonl` and `out_dir/audio/<id>.wav` from the `data` files; return a summary dict
    (`rows`, `seconds`, `manifest`). `question_column` / `id_column` of `None` mean "question" / "id" when present.
    """
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, got {limit}.")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must be letters, digits, '.', '_' or '-' (it names files), got {name!r}.")
    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, f"{name}.jsonl")

    records, stems, total_seconds, index = [], {}, 0.0, 0
    loaded = []
    for path in data:
        path = os.fspath(path)
        wanted = [audio_column, answer_column, question_column or "question", id_column or "id"]
        available, rows = load_rows(path, wanted)
        required = [audio_column, answer_column] + [c for c in (question_column, id_column) if c is not None]
        missing = [column for column in required if column not in available]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; available columns: {available}.")
        loaded.append((path, available, rows))

    # Default ids are zero-padded to one width (at least 4 digits) so they sort in row order.
    total = sum(len(rows) for _, _, rows in loaded)
    width = max(4, len(str(max(total - 1, 0))))
    for path, available, rows in loaded:
        base_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        has_question = (question_column or "question") in available
        has_id = (id_column or "id") in available
        for row_number, row in enumerate(rows):
            if limit is not None and len(records) >= limit:
                break
            where = f"{path}: row {row_number}"
            if has_id and row.get(id_column or "id") not in (None, ""):
                identifier = str(row[id_column or "id"]).strip()
            else:
                identifier = f"{name}-{index:0{width}d}"
            where += f" (id {identifier!r})"
            answers = normalize_answers(row.get(answer_column), where)
            waveform = decode_audio(row.get(audio_column), base_dir, where)
            stem = _file_stem(identifier)
            if stem in stems:
                raise ValueError(f"{where}: duplicate id (file name {stem!r}) of {stems[stem]}.")
            stems[stem] = where
            sf.write(os.path.join(audio_dir, f"{stem}.wav"), waveform, DEFAULT_SAMPLING_RATE, subtype="FLOAT")
            total_seconds += len(waveform) / DEFAULT_SAMPLING_RATE
            record = {"id": identifier, "audio": f"audio/{stem}.wav", "answers": answers}
            question = row.get(question_column or "question") if has_question else None
            if isinstance(question, str) and question.strip():
                record["question"] = question.strip()
            records.append(record)
            index += 1
    if not records:
        raise ValueError(f"No rows in {list(data)}.")
    with open(manifest_path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"rows": len(records), "seconds": total_seconds, "manifest": manifest_path}


def main(argv=None):
    """Command line: convert, print a one-line summary, return the summary dict."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument(
        "--data", nargs="+", required=True, help="parquet / jsonl / json / arrow files or save_to_disk directories"
    )
    parser.add_argument("--out", required=True, help="output directory (manifest + audio/)")
    parser.add_argument("--name", default="llama_questions", help="manifest name and default id prefix")
    parser.add_argument("--question-column", default=None, help="default: 'question' when present")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--id-column", default=None, help="default: 'id' when present, else <name>-<row index>")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N rows")
    args = parser.parse_args(argv)
    summary = convert(
        args.data, args.out, name=args.name, question_column=args.question_column, answer_column=args.answer_column,
        audio_column=args.audio_column, id_column=args.id_column, limit=args.limit,
    )
    print(f"wrote {summary['rows']} rows ({summary['seconds']:.1f} s of audio) to {summary['manifest']}")
    return summary


if __name__ == "__main__":
    main()
