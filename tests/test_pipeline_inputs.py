"""pipeline("speech-to-speech") takes its inputs the way transformers' automatic-speech-recognition pipeline does."""

import io
import shutil

import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly
from transformers import (
    AutomaticSpeechRecognitionPipeline,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import modeling_echox  # noqa: F401  (registers the task)
from modeling_echox import SpeechToSpeechPipeline

SR = 16000
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (make installs it)")


def noise(seconds, seed):
    return (0.05 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def wav_bytes(samples, rate=SR):
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def asr(speech_to_speech):
    """transformers' ASR pipeline on a tiny random Whisper with the EchoX checkpoint's feature extractor."""
    feature_extractor = speech_to_speech.processor.feature_extractor
    config = WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_target_positions=16,
        num_mel_bins=feature_extractor.feature_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = WhisperForConditionalGeneration(config).eval()
    return AutomaticSpeechRecognitionPipeline(model=model, feature_extractor=feature_extractor)


def asr_features(asr, inputs):
    inputs = dict(inputs) if isinstance(inputs, dict) else inputs  # the ASR pipeline pops entries of dicts
    (processed,) = list(asr.preprocess(inputs))
    return processed["input_features"]


CLIP = noise(1.2, 0)
ACCEPTED = {
    "float32 array": lambda path: CLIP,
    "float64 array": lambda path: CLIP.astype(np.float64),
    "torch tensor": lambda path: torch.from_numpy(CLIP),
    "channels-first stereo": lambda path: np.stack([CLIP, 0.5 * CLIP]),
    "raw dict": lambda path: {"raw": CLIP, "sampling_rate": SR},
    "datasets row": lambda path: {"path": "clip.wav", "array": CLIP, "sampling_rate": SR},
    "path": lambda path: path,
    "bytes": pytest.param(lambda path: wav_bytes(CLIP), marks=needs_ffmpeg),
}


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("audio") / "clip.wav")
    soundfile.write(path, CLIP, SR, subtype="PCM_16")
    return path


@pytest.mark.parametrize("make", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_accepts_what_asr_accepts_with_the_same_features(speech_to_speech, asr, clip_path, make):
    ours = speech_to_speech.preprocess(make(clip_path))["input_features"]
    torch.testing.assert_close(ours, asr_features(asr, make(clip_path)), atol=1e-5, rtol=0)


def test_dict_audio_is_resampled(speech_to_speech):
    slow = noise(1.0, 1)[::2].copy()  # 8 kHz
    by_dict = speech_to_speech.preprocess({"raw": slow, "sampling_rate": SR // 2})["input_features"]
    by_argument = speech_to_speech.preprocess(slow, sampling_rate=SR // 2)["input_features"]
    expected = speech_to_speech.preprocess(resample_poly(slow.astype(np.float64), 2, 1).astype(np.float32))
    torch.testing.assert_close(by_dict, expected["input_features"])
    torch.testing.assert_close(by_argument, expected["input_features"])
    assert not torch.allclose(by_dict, speech_to_speech.preprocess(slow)["input_features"])  # not read as 16 kHz


REFUSED = {
    "dict without rate": ({"array": CLIP}, "sampling_rate"),
    "dict without samples": ({"sampling_rate": SR}, "'raw'"),
    "dict with a path only": ({"path": "clip.wav"}, "'raw'"),
    "number": (0.5, "float"),
    "3-D array": (CLIP.reshape(1, 2, -1), "dimensions"),
    "missing file": ("/nonexistent/question.wav", "not found"),
    "bytes of no audio": pytest.param(b"not an audio file", "format", marks=needs_ffmpeg),
}


@pytest.mark.parametrize("bad, message", list(REFUSED.values()), ids=list(REFUSED))
def test_refuses_what_asr_refuses_with_a_clear_error(speech_to_speech, asr, bad, message):
    with pytest.raises((ValueError, TypeError, OSError)):
        asr_features(asr, bad)
    with pytest.raises((ValueError, OSError), match=message):
        speech_to_speech.preprocess(bad)


def test_empty_list_and_urls_are_refused(speech_to_speech):
    with pytest.raises(ValueError, match="empty list"):
        speech_to_speech([])
    with pytest.raises(ValueError, match="URL"):
        speech_to_speech.preprocess("https://example.org/question.wav")


@pytest.fixture(scope="module")
def batch(clip_path):
    """Inputs of different kinds whose answers differ from one another (clips of different lengths); an odd count
    leaves a last batch of one."""
    third = clip_path if shutil.which("ffmpeg") is None else wav_bytes(noise(0.9, 5))
    return [noise(0.5, 3), {"raw": noise(0.75, 4), "sampling_rate": SR}, third]


def test_batch_size_two_gives_the_answers_of_batch_size_one(speech_to_speech, batch):
    one_by_one = speech_to_speech(batch, max_new_tokens=4)
    by_two = speech_to_speech(batch, max_new_tokens=4, batch_size=2)
    assert len(one_by_one) == len(by_two) == len(batch)
    assert len({answer["text"] for answer in one_by_one}) == len(batch)  # the order is visible in the answers
    for alone, together in zip(one_by_one, by_two):
        assert together["text"] == alone["text"]
        assert together["sampling_rate"] == alone["sampling_rate"] == SR
        assert together["audio"].dtype == np.float32 and together["audio"].ndim == 1
        np.testing.assert_allclose(together["audio"], alone["audio"], atol=1e-5)


def test_generation_parameters_reach_generate(speech_to_speech):
    clip = noise(0.5, 3)
    full = speech_to_speech(clip)["text"]
    direct = speech_to_speech(clip, max_new_tokens=2)["text"]
    assert direct != full and full.startswith(direct)
    assert speech_to_speech(clip, generate_kwargs={"max_new_tokens": 2})["text"] == direct
    model, processor = speech_to_speech.model, speech_to_speech.processor
    assert SpeechToSpeechPipeline(model=model, processor=processor, max_new_tokens=2)(clip)["text"] == direct

    torch.manual_seed(0)
    sampled = speech_to_speech(clip, max_new_tokens=4, do_sample=True, temperature=50.0)["text"]
    torch.manual_seed(0)
    assert speech_to_speech(clip, generate_kwargs={"max_new_tokens": 4, "do_sample": True, "temperature": 50.0})[
        "text"
    ] == sampled
    assert not full.startswith(sampled)  # drawn from an almost flat distribution, not the greedy answer


def test_generation_parameter_conflicts_are_refused(speech_to_speech):
    clip = noise(0.5, 3)
    with pytest.raises(ValueError, match="'max_new_tokens' is defined twice"):
        speech_to_speech(clip, max_new_tokens=2, generate_kwargs={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="Unknown arguments.*max_tokens"):
        speech_to_speech(clip, max_tokens=2)
    with pytest.raises(ValueError, match="sets 'tokenizer' itself"):
        speech_to_speech(clip, generate_kwargs={"tokenizer": speech_to_speech.processor.tokenizer})
