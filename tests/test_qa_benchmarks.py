"""Converting local spoken-QA benchmark files (parquet / jsonl / arrow / save_to_disk) into `echox eval` manifests."""

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf

datasets = pytest.importorskip("datasets")

from modeling_echox.evaluation.spoken_qa import read_eval_manifest  # noqa: E402
from training.data import qa_benchmarks  # noqa: E402


def tone(seconds, rate, channels=1, freq=440.0):
    t = np.arange(int(round(seconds * rate))) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def wav_bytes(seconds, rate=22050, channels=2):
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, rate, channels), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


DURATIONS = [0.5, 1.0, 0.7]


def audio_dataset(answers=("paris", "four", "blue"), durations=DURATIONS, with_id=False):
    """A `datasets.Dataset` with an `Audio` feature column of 22.05 kHz stereo WAV bytes (cast, never encoded)."""
    columns = {
        "question": [f"question {i}?" for i in range(len(answers))],
        "answer": list(answers),
        "audio": [{"bytes": wav_bytes(seconds), "path": None} for seconds in durations],
    }
    if with_id:
        columns["id"] = [f"lq/{i}" for i in range(len(answers))]
    return datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio())


def check_output(manifest, durations):
    records = read_eval_manifest(manifest)
    assert len(records) == len(durations)
    for record, seconds in zip(records, durations):
        info = sf.info(record["audio"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.frames == pytest.approx(seconds * 16000, abs=2)
        assert info.subtype == "FLOAT"
    with open(manifest, encoding="utf-8") as handle:
        for line in handle:
            assert not os.path.isabs(json.loads(line)["audio"])
    return records


def test_parquet_with_audio_feature(tmp_path, capsys):
    dataset = audio_dataset()
    assert isinstance(dataset.features["audio"], datasets.Audio)
    path = str(tmp_path / "test.parquet")
    dataset.to_parquet(path)
    summary = qa_benchmarks.main(["--data", path, "--out", str(tmp_path / "out")])
    manifest = str(tmp_path / "out" / "llama_questions.jsonl")
    assert summary == {"rows": 3, "seconds": pytest.approx(sum(DURATIONS), abs=1e-3), "manifest": manifest}
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"wrote 3 rows (2.2 s of audio) to {manifest}"]
    records = check_output(manifest, DURATIONS)
    assert [r["id"] for r in records] == ["llama_questions-0000", "llama_questions-0001", "llama_questions-0002"]
    assert [r["answers"] for r in records] == [["paris"], ["four"], ["blue"]]
    assert [r["question"] for r in records] == ["question 0?", "question 1?", "question 2?"]
    # The content survives: the 16 kHz mono file is the downmixed, resampled tone.
    wave, _ = sf.read(records[0]["audio"], dtype="float32")
    expected = tone(0.5, 16000)
    assert np.abs(wave[200:-200] - expected[200:-200]).max() < 5e-3


def test_save_to_disk_arrow_limit_and_id_column(tmp_path):
    disk = str(tmp_path / "disk")
    audio_dataset(with_id=True).save_to_disk(disk)
    records = check_output(qa_benchmarks.convert([disk], str(tmp_path / "a"), name="lq")["manifest"], DURATIONS)
    assert [r["id"] for r in records] == ["lq/0", "lq/1", "lq/2"]
    assert os.path.basename(records[0]["audio"]) == "lq_0.wav"
    # A single-split DatasetDict directory, and the .arrow file itself, with --limit.
    dict_dir = str(tmp_path / "dict")
    datasets.DatasetDict({"test": audio_dataset()}).save_to_disk(dict_dir)
    summary = qa_benchmarks.convert([dict_dir], str(tmp_path / "b"), limit=2)
    check_output(summary["manifest"], DURATIONS[:2])
    arrow = [f for f in os.listdir(disk) if f.endswith(".arrow")][0]
    summary = qa_benchmarks.main(["--data", os.path.join(disk, arrow), "--out", str(tmp_path / "c"), "--limit", "1"])
    assert summary["rows"] == 1


def test_jsonl_with_paths_and_aliases(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(str(clips / "a.flac"), tone(1.25, 24000), 24000)
    sf.write(str(clips / "b.wav"), tone(0.5, 16000, channels=2), 16000)
    rows = [
        {"qid": "wq-1", "audio_path": "clips/a.flac", "answers": ["Barack Obama", "obama", "OBAMA", " barack  obama "]},
        {"qid": "wq-2", "audio_path": str(clips / "b.wav"), "answers": "Lake Victoria"},
    ]
    data = tmp_path / "web_questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = qa_benchmarks.main([
        "--data", str(data), "--out", str(tmp_path / "out"), "--name", "web_questions",
        "--audio-column", "audio_path", "--answer-column", "answers", "--id-column", "qid",
    ])
    assert summary["manifest"].endswith("web_questions.jsonl")
    records = check_output(summary["manifest"], [1.25, 0.5])
    assert [r["id"] for r in records] == ["wq-1", "wq-2"]
    assert records[0]["answers"] == ["Barack Obama", "obama"]
    assert records[1]["answers"] == ["Lake Victoria"]
    assert "question" not in records[0]


def test_triviaqa_dict_answers_and_multiple_files(tmp_path):
    row = {
        "question": "Which city hosted the 1900 Olympics?",
        "answer": {"value": "Paris", "aliases": ["Paris", "Paris, France", "paris"],
                   "normalized_aliases": ["paris", "paris france"], "normalized_value": "paris"},
        "audio": {"array": tone(0.4, 8000).tolist(), "sampling_rate": 8000},
    }
    first = tmp_path / "trivia.json"
    first.write_text(json.dumps([row]))
    second = tmp_path / "more.jsonl"
    second.write_text(json.dumps({**row, "answer": ["Athens"]}) + "\n")
    summary = qa_benchmarks.convert([str(first), str(second)], str(tmp_path / "out"), name="triviaqa")
    records = check_output(summary["manifest"], [0.4, 0.4])
    assert records[0]["answers"] == ["Paris", "Paris, France"]
    assert records[1]["answers"] == ["Athens"]
    assert [r["id"] for r in records] == ["triviaqa-0000", "triviaqa-0001"]


def test_missing_column_lists_available(tmp_path):
    path = str(tmp_path / "test.parquet")
    audio_dataset().to_parquet(path)
    expected = r"missing column\(s\) \['answers'\]; available columns: \['question', 'answer', 'audio'\]"
    with pytest.raises(ValueError, match=expected):
        qa_benchmarks.convert([path], str(tmp_path / "out"), answer_column="answers")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['qid'\]"):
        qa_benchmarks.convert([path], str(tmp_path / "out"), id_column="qid")


def test_empty_answer_names_the_row(tmp_path):
    path = str(tmp_path / "test.parquet")
    audio_dataset(answers=("paris", "  ", "blue")).to_parquet(path)
    with pytest.raises(ValueError, match=r"row 1 \(id 'llama_questions-0001'\): the answer is empty"):
        qa_benchmarks.convert([path], str(tmp_path / "out"))
    data = tmp_path / "x.jsonl"
    row = {"id": "t7", "audio": {"bytes": None, "path": None}, "answer": {"value": "", "aliases": []}}
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"row 0 \(id 't7'\): the answer is empty"):
        qa_benchmarks.convert([str(data)], str(tmp_path / "out"))


def test_corrupt_audio_bytes_is_a_clear_error(tmp_path):
    dataset = datasets.Dataset.from_dict({
        "answer": ["a", "b"],
        "audio": [{"bytes": wav_bytes(0.2), "path": None}, {"bytes": b"RIFF not really a wav", "path": None}],
    }).cast_column("audio", datasets.Audio())
    path = str(tmp_path / "bad.parquet")
    dataset.to_parquet(path)
    with pytest.raises(ValueError, match=r"row 1 \(id 'llama_questions-0001'\): could not decode the audio bytes"):
        qa_benchmarks.convert([path], str(tmp_path / "out"))
    data = tmp_path / "missing.jsonl"
    data.write_text(json.dumps({"audio": "nowhere.wav", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 .*audio file not found"):
        qa_benchmarks.convert([str(data)], str(tmp_path / "out"))
