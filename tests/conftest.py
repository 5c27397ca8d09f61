import os
import shutil
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory):
    """A spoken question (flite, "what is the capital of france") or, without flite, a voiced-sounding 16 kHz clip."""
    import numpy as np
    import soundfile

    path = tmp_path_factory.mktemp("questions") / "question.wav"
    if shutil.which("flite"):
        subprocess.run(["flite", "-voice", "slt", "-t", "what is the capital of france", "-o", str(path)], check=True)
    else:
        rate = 16000
        t = np.arange(int(1.5 * rate)) / rate
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(np.pi * t / 1.5)).astype(np.float32), rate)
    return str(path)


@pytest.fixture(scope="module")
def speech_to_speech(tmp_path_factory):
    """`pipeline("speech-to-speech")` on a tiny random checkpoint; each clip's own frames reach the adapter, so
    different clips get different answers from the random model; 8 echo-decoder tokens per segment keep it quick."""
    from transformers import pipeline

    import modeling_echox  # noqa: F401  (registers the task)
    from modeling_echox.testing.random_checkpoint import write_random_checkpoint

    speech_to_speech = pipeline("speech-to-speech", model=write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt"))))
    speech_to_speech.model.config.crop_audio_padding = True
    speech_to_speech.model.generation_config.echo_max_new_tokens = 8
    return speech_to_speech
