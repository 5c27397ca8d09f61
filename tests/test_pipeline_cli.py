"""pipeline("speech-to-speech"), `echox speak --stream`, and the latency benchmark script."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from transformers import pipeline

import modeling_echox  # noqa: F401  (registers the task)
from modeling_echox.cli import main
from modeling_echox.testing.random_checkpoint import write_random_checkpoint

SR = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("audio") / "q.wav")
    rng = np.random.default_rng(0)
    soundfile.write(path, (0.05 * rng.standard_normal(int(1.5 * SR))).astype(np.float32), SR)
    return path


def test_pipeline_inputs_and_outputs(checkpoint, question):
    speech_to_speech = pipeline("speech-to-speech", model=checkpoint)
    array, _ = soundfile.read(question, dtype="float32")
    by_path = speech_to_speech(question)
    assert set(by_path) == {"text", "audio", "sampling_rate"}
    assert by_path["sampling_rate"] == 16000 and by_path["audio"].dtype == np.float32
    by_array = speech_to_speech(array, sampling_rate=SR)
    by_dict = speech_to_speech({"array": array, "sampling_rate": SR})
    assert by_array["text"] == by_path["text"] == by_dict["text"]
    np.testing.assert_allclose(by_array["audio"], by_path["audio"], atol=1e-6)
    many = speech_to_speech([question, {"array": array, "sampling_rate": SR}], segmentation_mode="fast")
    assert len(many) == 2 and all(item["text"] for item in many)
    with pytest.raises(ValueError, match="silent"):
        speech_to_speech(np.zeros(SR, dtype=np.float32), sampling_rate=SR)
    assert speech_to_speech(question)["text"] == by_path["text"]  # still fine after a bad request


def test_cli_speak_stream_writes_the_same_audio(checkpoint, question, tmp_path, capsys):
    streamed, whole = tmp_path / "streamed.wav", tmp_path / "whole.wav"
    assert main(["speak", question, "-o", str(streamed), "--model", checkpoint, "--stream", "--mode", "fast"]) == 0
    log = capsys.readouterr().err
    assert "segment 0" in log and " ms]" in log
    assert main(["speak", question, "-o", str(whole), "--model", checkpoint, "--mode", "fast"]) == 0
    a, _ = soundfile.read(streamed)
    b, _ = soundfile.read(whole)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=2 / 32768)  # 16-bit PCM rounding


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed (make installs it)")
def test_latency_benchmark_runs(checkpoint, tmp_path):
    out = tmp_path / "latency.json"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--model", checkpoint, "--out", str(out)]
    subprocess.run(command + ["--questions", "2"], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    for mode in ("faithful", "fast"):
        for key in ("first_audio_ms_p50", "first_audio_ms_p90", "rtf", "peak_rss_mb", "first_text_token_ms_p50"):
            assert result[mode][key] > 0
        assert result[mode]["first_audio_ms_p50"] >= result[mode]["first_text_token_ms_p50"]
