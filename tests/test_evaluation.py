"""`echox eval`: answer matching, the manifest, the harness end to end on a tiny random model, the evaluate metric."""

import json
import os

import numpy as np
import pytest
import soundfile

from modeling_echox.evaluation.spoken_qa import evaluate_spoken_qa, read_eval_manifest
from modeling_echox.evaluation.text_metrics import answer_in_text, is_correct
from modeling_echox.testing.random_checkpoint import build_random_echox


@pytest.mark.parametrize(
    "answer, text, expected",
    [
        ("nairobi", "The capital of Kenya is Nairobi.", True),
        ("seven", "three plus four is seventeen", False),  # whole words only
        ("seven", "It's 7!", True),  # digits are spelled out
        ("north america", "it is in North   America", True),
        ("north america", "america is north of here", False),  # a run, in order
        ("", "anything", False),
    ],
)
def test_answer_in_text(answer, text, expected):
    assert answer_in_text(answer, text) is expected


def test_all_words_rule_is_looser():
    assert not is_correct(["north america"], "america is north of here", "contained")
    assert is_correct(["north america"], "america is north of here", "all_words")
    with pytest.raises(ValueError, match="rule"):
        is_correct(["x"], "x", "fuzzy")


def _write_manifest(tmp_path, lines):
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _clip(tmp_path, name, seconds=1.0, seed=0):
    audio = 0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32)
    soundfile.write(tmp_path / name, audio, 16000)
    return name


def test_manifest_validation(tmp_path):
    clip = _clip(tmp_path, "a.wav")
    good = {"id": "q1", "audio": clip, "answers": ["paris"], "question": "capital of france"}
    records = read_eval_manifest(_write_manifest(tmp_path, [good]))
    assert records[0]["audio"] == os.path.join(str(tmp_path), clip)
    with pytest.raises(ValueError, match="missing field"):
        read_eval_manifest(_write_manifest(tmp_path, [{"id": "q1", "audio": clip}]))
    with pytest.raises(ValueError, match="non-empty list"):
        read_eval_manifest(_write_manifest(tmp_path, [{**good, "answers": []}]))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_eval_manifest(_write_manifest(tmp_path, [{**good, "audio": "missing.wav"}]))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_eval_manifest(str(tmp_path / "bad.jsonl"))
    many = [{**good, "id": f"q{i}"} for i in range(10)]
    subset = read_eval_manifest(_write_manifest(tmp_path, many), limit=4, seed=1)
    assert len(subset) == 4 and subset == read_eval_manifest(_write_manifest(tmp_path, many), limit=4, seed=1)


class _EchoTranscriber:
    """A stand-in ASR that 'hears' a fixed sentence and records what it was given."""

    def __init__(self, text):
        self.text, self.calls = text, []

    def __call__(self, audio):
        self.calls.append(audio)
        return self.text


class _FixedLLM:
    def __init__(self, answers):
        self.answers = answers

    def __call__(self, questions):
        return [self.answers[q] for q in questions]


def test_harness_scores_every_item(tmp_path):
    model, processor = build_random_echox("tiny")
    lines = [
        {"id": f"q{i}", "audio": _clip(tmp_path, f"{i}.wav", 0.5 + 0.2 * i, seed=i), "answers": [answer],
         "question": question, "kind": kind}
        for i, (answer, question, kind) in enumerate(
            [("paris", "capital of france", "capital"), ("tuesday", "after monday", "day"), ("rome", "capital of italy", "capital")]
        )
    ]
    records = read_eval_manifest(_write_manifest(tmp_path, lines))
    transcriber = _EchoTranscriber("i think it is paris")
    text_llm = _FixedLLM({"capital of france": "Paris.", "after monday": "Wednesday", "capital of italy": "Rome"})
    result = evaluate_spoken_qa(model, processor, records, transcriber, text_llm, batch_size=2)

    assert result["n"] == 3 and len(result["items"]) == 3
    assert len(transcriber.calls) == 3 and all(call.dtype == np.float32 for call in transcriber.calls)
    assert result["s2s_accuracy"] == pytest.approx(1 / 3)  # only the "paris" item matches the transcript
    assert result["text_llm_accuracy"] == pytest.approx(2 / 3)
    assert result["by_kind"]["capital"]["text_llm_accuracy"] == 1.0
    assert result["by_kind"]["day"]["s2s_accuracy"] == 0.0
    for item in result["items"]:  # s2t is scored on the model's own (random) text
        assert item["s2t_correct"]["contained"] == is_correct(item["answers"], item["text"])
    assert 0.0 <= result["speech_text_wer"]


def test_harness_text_only(tmp_path):
    model, processor = build_random_echox("tiny")
    line = {"id": "q", "audio": _clip(tmp_path, "q.wav"), "answers": ["x"]}
    result = evaluate_spoken_qa(model, processor, read_eval_manifest(_write_manifest(tmp_path, [line])))
    assert "s2s_accuracy" not in result and "text_llm_accuracy" not in result and result["n"] == 1


def test_evaluate_metric_from_local_path():
    evaluate = pytest.importorskip("evaluate")
    from modeling_echox.evaluation.metrics import SPOKEN_QA_METRIC

    metric = evaluate.load(SPOKEN_QA_METRIC)
    scores = metric.compute(
        predictions=["The capital of Kenya is Nairobi.", "three plus four is seventeen", "america, north"],
        references=[["nairobi"], ["seven"], ["north america"]],
    )
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["accuracy_all_words"] == pytest.approx(2 / 3)


def test_answer_asr_decodes_at_temperature_zero_only(monkeypatch):
    """faster-whisper's default falls back to sampled decoding at rising temperatures when a pass looks unlikely,
    which made the same spoken answer give different transcripts from run to run; the evaluation's ASR must not."""
    import sys
    import types

    import numpy as np

    from modeling_echox.evaluation.asr import WhisperTranscriber

    calls = []

    class FakeWhisperModel:
        def __init__(self, *args, **kwargs):
            pass

        def transcribe(self, audio, **kwargs):
            calls.append(kwargs)
            return iter([types.SimpleNamespace(text=" hello ")]), None

    monkeypatch.setitem(sys.modules, "faster_whisper", types.SimpleNamespace(WhisperModel=FakeWhisperModel))
    transcriber = WhisperTranscriber(model_path="unused")
    assert transcriber(np.zeros(1600, np.float32)) == "hello"
    assert calls[0]["temperature"] == 0.0


def test_normalize_text_reads_ordinals_only_after_whole_numbers():
    from modeling_echox.evaluation.text_metrics import normalize_text, word_error_rate

    assert normalize_text("the 3rd and 21st") == "the third and twenty first"
    assert normalize_text("2.5 kg") == "two point five kg"
    assert normalize_text("at 2.20th") == "at two point two th"  # a decimal never takes an ordinal suffix
    assert word_error_rate(["it is two twenty"], ["It's 2.20th."]) > 0  # scored, not an error
