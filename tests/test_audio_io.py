"""Tests of `modeling_echox.model.audio_io.load_audio`: every accepted input type, resampling, and every refused input."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from modeling_echox.model.audio_io import load_audio


def _sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


# ---------------------------------------------------------------------------------------------- accepted inputs


def test_mono_float_array_at_16k_is_returned_unchanged():
    wave = _sine(16000, 0.5)
    original = wave.copy()
    out = load_audio(wave, sampling_rate=16000)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_array_equal(out, wave)
    np.testing.assert_array_equal(wave, original)  # the input is not modified


def test_float64_array_becomes_float32():
    out = load_audio(_sine(16000, 0.25).astype(np.float64), sampling_rate=16000)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    "dtype, value, expected",
    [
        (np.int16, 16384, 0.5),
        (np.int16, -32768, -1.0),
        (np.int32, 2**30, 0.5),
        (np.uint8, 255, 127 / 128),
        (np.uint8, 0, -1.0),
        (np.int8, -64, -0.5),
    ],
)
def test_integer_pcm_is_scaled_to_unit_range(dtype, value, expected):
    samples = np.zeros(1600, dtype=dtype)
    if dtype == np.uint8:
        samples[:] = 128  # unsigned 8-bit PCM is centred on 128
    samples[10] = value
    out = load_audio(samples, sampling_rate=16000)
    assert out.dtype == np.float32
    assert out[10] == pytest.approx(expected)
    assert np.abs(out).max() <= 1.0
    assert out[0] == 0.0


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_stereo_numpy_is_downmixed_in_either_layout(layout):
    left, right = _sine(16000, 0.5, amplitude=0.6), _sine(16000, 0.5, amplitude=0.2)
    stereo = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    out = load_audio(stereo, sampling_rate=16000)
    assert out.shape == left.shape
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)


def test_multichannel_up_to_eight_channels():
    channels = np.stack([_sine(16000, 0.25, amplitude=0.1 * (i + 1)) for i in range(8)], axis=1)
    out = load_audio(channels, sampling_rate=16000)
    np.testing.assert_allclose(out, channels.mean(axis=1), atol=1e-6)


def test_single_channel_2d_is_mono():
    wave = _sine(16000, 0.25)
    np.testing.assert_array_equal(load_audio(wave[None, :], sampling_rate=16000), wave)
    np.testing.assert_array_equal(load_audio(wave[:, None], sampling_rate=16000), wave)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_tensors(dtype):
    stereo = torch.from_numpy(np.stack([_sine(16000, 0.25), _sine(16000, 0.25)])).to(dtype)
    out = load_audio(stereo, sampling_rate=16000)
    assert out.dtype == np.float32 and out.shape == (4000,)
    np.testing.assert_allclose(out, stereo.float().mean(0).numpy(), atol=1e-6)
    out_t = load_audio(stereo.T, sampling_rate=16000)  # [samples, channels]
    np.testing.assert_allclose(out_t, out, atol=1e-6)


def test_torch_int16_tensor():
    tensor = torch.full((1600,), 8192, dtype=torch.int16)
    np.testing.assert_allclose(load_audio(tensor, sampling_rate=16000), 0.25)


def test_dict_input_and_rate_resolution():
    wave = _sine(8000, 0.5)
    out = load_audio({"array": wave, "sampling_rate": 8000})
    assert out.shape == (8000,)
    # matching explicit rate is fine, conflicting one is refused
    assert load_audio({"array": wave, "sampling_rate": 8000}, sampling_rate=8000).shape == (8000,)
    with pytest.raises(ValueError, match="sampling_rate"):
        load_audio({"array": wave, "sampling_rate": 8000}, sampling_rate=16000)
    # a dict without a rate takes the explicit one
    assert load_audio({"array": wave}, sampling_rate=8000).shape == (8000,)
    with pytest.raises(ValueError, match="sampling rate is needed"):
        load_audio({"array": wave})


def test_dict_with_path(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, _sine(16000, 0.5), 16000, subtype="FLOAT")
    out = load_audio({"path": str(path), "array": None})
    assert out.shape == (8000,)


def test_float_wav_file_and_pathlike(tmp_path):
    wave = _sine(16000, 0.5)
    path = tmp_path / "mono.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    for source in (str(path), Path(path)):
        out = load_audio(source)
        np.testing.assert_array_equal(out, wave)


def test_int16_stereo_file_at_44k1_is_downmixed_resampled_and_scaled(tmp_path):
    rate, seconds = 44100, 1.5
    left = _sine(rate, seconds, freq=1000.0, amplitude=0.5)
    right = _sine(rate, seconds, freq=1000.0, amplitude=0.25)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)
    path = tmp_path / "stereo_44k1.wav"
    sf.write(path, pcm, rate, subtype="PCM_16")
    assert sf.info(path).channels == 2 and sf.info(path).samplerate == rate

    out = load_audio(path)
    n_in = pcm.shape[0]
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == math.ceil(n_in * 160 / 441)  # 16000/44100 = 160/441, exact rational resampling
    assert _peak_frequency(out, 16000) == pytest.approx(1000.0, abs=2.0)
    # downmix of 0.5 and 0.25 amplitude channels → 0.375 (away from the filter edges)
    assert np.abs(out[2000:-2000]).max() == pytest.approx(0.375, abs=0.01)


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_resampling_length_and_frequency(rate):
    seconds, freq = 1.0, 440.0
    out = load_audio(_sine(rate, seconds, freq=freq), sampling_rate=rate)
    assert len(out) == math.ceil(int(rate * seconds) * 16000 / rate)
    assert _peak_frequency(out, 16000) == pytest.approx(freq, abs=2.0)


def test_custom_target_rate():
    out = load_audio(_sine(16000, 1.0), sampling_rate=16000, target_rate=8000)
    assert len(out) == 8000


def test_float_sampling_rate_with_integer_value_is_accepted():
    assert load_audio(_sine(16000, 0.25), sampling_rate=16000.0).shape == (4000,)


def test_max_seconds_none_disables_the_limit():
    assert load_audio(_sine(16000, 31.0), sampling_rate=16000, max_seconds=None).shape == (16000 * 31,)


def test_exactly_max_seconds_is_accepted():
    assert load_audio(_sine(16000, 30.0), sampling_rate=16000).shape == (480000,)


# ---------------------------------------------------------------------------------------------- refused inputs


def test_missing_file_raises_oserror(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(OSError, match="nope.wav"):
        load_audio(missing)


def test_directory_raises_oserror(tmp_path):
    with pytest.raises(OSError, match="not a file"):
        load_audio(tmp_path)


def test_corrupt_file_raises_oserror_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(OSError, match="corrupt.wav"):
        load_audio(path)


def test_text_file_with_wav_name_raises_oserror(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(OSError, match="notes.wav"):
        load_audio(str(path))


def test_empty_file_raises_valueerror(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="empty"):
        load_audio(path)


def test_silent_file_raises_valueerror(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, dtype=np.int16), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match="silent"):
        load_audio(path)


def test_array_without_sampling_rate_raises():
    with pytest.raises(ValueError, match="sampling rate is needed"):
        load_audio(_sine(16000, 0.25))
    with pytest.raises(ValueError, match="sampling rate is needed"):
        load_audio(torch.from_numpy(_sine(16000, 0.25)))


@pytest.mark.parametrize(
    "samples, match",
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros((2, 0), dtype=np.float32), "empty"),
        (np.array([0.1, np.nan, 0.2], dtype=np.float32), "NaN or infinite"),
        (np.array([0.1, np.inf, 0.2], dtype=np.float32), "NaN or infinite"),
        (np.zeros(16000, dtype=np.float32), "silent"),
        (np.full(16000, 5e-5, dtype=np.float32), "silent"),
        (np.zeros(16000, dtype=np.int16), "silent"),
        (np.ones((2, 2, 100), dtype=np.float32), "3 dimensions"),
        (np.float32(0.5), "0 dimensions"),
        (np.ones(100, dtype=bool), "boolean"),
        (np.ones(100, dtype=np.complex64), "complex"),
        (np.ones(100, dtype=np.int64), "unsupported dtype"),
        (np.ones((100, 100), dtype=np.float32) * 0.1, "channel"),
        (np.ones((4, 4), dtype=np.float32) * 0.1, "ambiguous"),
    ],
)
def test_bad_arrays_raise_valueerror(samples, match):
    with pytest.raises(ValueError, match=match):
        load_audio(samples, sampling_rate=16000)


def test_too_long_is_refused_with_limit_and_duration_never_truncated():
    with pytest.raises(ValueError) as info:
        load_audio(_sine(16000, 31.0), sampling_rate=16000)
    message = str(info.value)
    assert "30 s" in message and "31.00 s" in message and "too long" in message
    with pytest.raises(ValueError, match=r"1\.50 s.*at most 1 s"):
        load_audio(_sine(44100, 1.5), sampling_rate=44100, max_seconds=1.0)


def test_too_long_file_is_refused(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _sine(8000, 2.0), 8000)
    with pytest.raises(ValueError, match="long.wav.*too long"):
        load_audio(path, max_seconds=1.5)


@pytest.mark.parametrize("rate", [0, -16000, 22050.5, "16000", True, float("nan")])
def test_bad_sampling_rates(rate):
    with pytest.raises(ValueError, match="sampling_rate"):
        load_audio(_sine(16000, 0.25), sampling_rate=rate)


def test_unsupported_source_types_raise_typeerror():
    with pytest.raises(TypeError, match="list"):
        load_audio([0.1, 0.2, 0.3], sampling_rate=16000)
    with pytest.raises(TypeError):
        load_audio(b"RIFF....", sampling_rate=16000)


def test_dict_without_array_or_path():
    with pytest.raises(ValueError, match="'array'"):
        load_audio({"sampling_rate": 16000})


def test_no_global_state_between_calls(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, _sine(22050, 0.5), 22050)
    first = load_audio(path)
    load_audio(_sine(48000, 0.5), sampling_rate=48000)
    np.testing.assert_array_equal(load_audio(os.fspath(path)), first)


# ---------------------------------------------------------------------------------------------- truncated files

_FORMATS = {  # extension, soundfile subtype
    "wav16": ("wav", "PCM_16"),
    "wavfloat": ("wav", "FLOAT"),
    "aiff": ("aiff", "PCM_16"),
    "ogg": ("ogg", "VORBIS"),
    "opus": ("ogg", "OPUS"),
    "mp3": ("mp3", "MPEG_LAYER_III"),
    "flac": ("flac", "PCM_16"),
}


def _write_whole(tmp_path, kind: str, seconds: float = 3.0) -> Path:
    extension, subtype = _FORMATS[kind]
    if extension.upper() not in sf.available_formats() and not (kind == "mp3" and "MP3" in sf.available_formats()):
        pytest.skip(f"libsndfile here cannot write {extension}")
    rate = 48000 if subtype == "OPUS" else 16000
    noise = 0.05 * np.random.default_rng(0).standard_normal(int(rate * seconds)).astype(np.float32)
    path = tmp_path / f"whole-{kind}.{extension}"
    sf.write(path, _sine(rate, seconds, amplitude=0.3) + noise, rate, subtype=subtype)
    return path


def _cut(path: Path, keep: int) -> Path:
    cut = path.with_name(f"cut-{keep}-{path.name}")
    cut.write_bytes(path.read_bytes()[:keep])
    return cut


@pytest.mark.parametrize("kind", list(_FORMATS))
def test_whole_files_of_every_format_are_accepted(tmp_path, kind):
    out = load_audio(_write_whole(tmp_path, kind))
    assert len(out) == 48000


@pytest.mark.parametrize("kind", ["wav16", "wavfloat", "aiff", "ogg", "opus", "mp3"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, -10])
def test_truncated_files_are_refused_naming_the_file(tmp_path, kind, fraction):
    whole = _write_whole(tmp_path, kind)
    size = whole.stat().st_size
    keep = size + fraction if fraction < 0 else max(int(size * fraction), 1000)
    cut = _cut(whole, keep)
    with pytest.raises((ValueError, OSError), match=f"cut-{keep}-whole-{kind}") as info:
        load_audio(cut)
    if info.type is ValueError:
        assert "truncated" in str(info.value)
    else:  # cut inside the first pages: libsndfile cannot even open it
        assert kind in ("ogg", "opus") and "not a readable audio file" in str(info.value)


@pytest.mark.parametrize("keep", [1000, 30000])
def test_truncated_wav_message_gives_declared_and_present_length(tmp_path, keep):
    whole = tmp_path / "long.wav"
    sf.write(whole, _sine(16000, 3.0), 16000, subtype="PCM_16")  # 44-byte header + 96000 bytes of samples
    with pytest.raises(ValueError) as info:
        load_audio(_cut(whole, keep))
    message = str(info.value)
    assert f"cut-{keep}-long.wav is truncated" in message
    assert f"declares 96000 bytes of audio data but only {keep - 44} are present" in message
    assert f"({(keep - 44) / 32000:.2f} s of 3.00 s)" in message


def test_truncated_flac_is_refused(tmp_path):
    whole = _write_whole(tmp_path, "flac")
    with pytest.raises(OSError, match="cut-.*flac: not a readable audio file"):
        load_audio(_cut(whole, whole.stat().st_size // 2))


def test_wav_with_unknown_data_size_or_extra_chunks_is_accepted(tmp_path):
    """Streaming writers leave the data size at 0xFFFFFFFF; other chunks may follow the samples (padded to even)."""
    wave = _sine(16000, 0.5)[:7999]
    path = tmp_path / "stream.wav"
    sf.write(path, wave, 16000, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    data_at = raw.index(b"data")
    raw[data_at + 4 : data_at + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    assert len(load_audio(path)) == 7999

    path = tmp_path / "list.wav"
    sf.write(path, wave, 16000, subtype="PCM_U8")  # 7999 one-byte samples: an odd-sized data chunk and a pad byte
    assert path.stat().st_size == 44 + 7999 + 1
    with open(path, "ab") as handle:
        handle.write(b"LIST" + (4).to_bytes(4, "little") + b"INFO")
    assert len(load_audio(path)) == 7999


def test_mp3_without_a_length_tag_is_not_judged_by_the_estimated_length():
    """libsndfile estimates an untagged MP3's length from its size: Gradio's own sample is shorter than that guess."""
    gradio = pytest.importorskip("gradio")
    path = Path(gradio.__file__).parent / "media_assets" / "audio" / "heath_ledger.mp3"
    if not path.is_file() or "MP3" not in sf.available_formats():
        pytest.skip("no Gradio MP3 sample, or libsndfile here reads no MP3")
    with sf.SoundFile(path) as handle:
        assert len(handle.read()) < handle.frames  # the estimate is off
    assert len(load_audio(path, max_seconds=None)) > 16000
