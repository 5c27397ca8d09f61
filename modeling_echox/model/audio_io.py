"""Audio loading and validation for EchoX: any file / array / dict → validated mono float32 at 16 kHz."""

import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

DEFAULT_SAMPLING_RATE = 16000
DEFAULT_MAX_SECONDS = 30.0
SILENCE_PEAK = 1e-4  # a clip whose absolute peak stays below this is refused as silent
MAX_CHANNELS = 8  # in a 2-D array, the channel axis is the short one (at most this many entries)

_INT_SCALES = {
    np.dtype(np.int8): (0.0, 128.0),
    np.dtype(np.int16): (0.0, 32768.0),
    np.dtype(np.int32): (0.0, 2147483648.0),
    np.dtype(np.uint8): (128.0, 128.0),  # 8-bit WAV PCM is unsigned, centred on 128
}


def _to_numpy(array: Any) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        torch = None
    if torch is not None and isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(array)


def _check_rate(rate: Any, what: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a positive integer number of Hz, got {rate!r}.")
    if not math.isfinite(float(rate)) or float(rate) <= 0 or float(rate) != int(rate):
        raise ValueError(f"{what} must be a positive integer number of Hz, got {rate!r}.")
    return int(rate)


def _riff_data_chunk(path: str, size: int) -> tuple[int, int] | None:
    """
    `(declared, present)` byte counts of the sample-data chunk of a WAV (RIFF / RIFX) or AIFF / AIFF-C file, or `None`
    for other files, when the chunk is absent, or when its size field says "unknown" (0 or 0xFFFFFFFF, as streaming
    writers leave it).
    """
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12:
            return None
        if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
            order, data_id, skip = ("<" if head[:4] == b"RIFF" else ">"), b"data", 0
        elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
            order, data_id, skip = ">", b"SSND", 8  # SSND data starts with 8 bytes of offset and block size
        else:
            return None
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            chunk_id, chunk_size = struct.unpack(order + "4sI", handle.read(8))
            if chunk_id == data_id:
                if chunk_size in (0, 0xFFFFFFFF):
                    return None
                return chunk_size - skip, size - (position + 8 + skip)
            position += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to an even length
    return None


def _ogg_is_complete(path: str, size: int) -> bool:
    """True when the Ogg pages tile the file exactly and the last one carries the end-of-stream flag."""
    position, flags = 0, 0
    with open(path, "rb") as handle:
        while position < size:
            handle.seek(position)
            header = handle.read(27)
            if len(header) < 27 or header[:4] != b"OggS":
                return False
            lacing = handle.read(header[26])
            if len(lacing) < header[26]:
                return False
            flags = header[5]
            position += 27 + len(lacing) + sum(lacing)
    return position == size and bool(flags & 0x04)


def _mp3_declares_length(path: str) -> bool:
    """
    True when an MP3 file's first frame carries a Xing / Info / VBRI tag: only then is its frame count exact (without
    one, libsndfile estimates it from the file size).
    """
    with open(path, "rb") as handle:
        head = handle.read(10)
        start = 0
        if len(head) == 10 and head[:3] == b"ID3":  # skip an ID3v2 tag: syncsafe size, plus a footer if flagged
            start = 10 + sum((byte & 0x7F) << shift for byte, shift in zip(head[6:10], (21, 14, 7, 0)))
            start += 10 if head[5] & 0x10 else 0
        handle.seek(start)
        block = handle.read(4096)
    sync = re.search(rb"\xff[\xe0-\xff]", block)
    first = block[sync.start() : sync.start() + 48] if sync else b""  # the tags sit right after the side info
    return any(tag in first for tag in (b"Xing", b"Info", b"VBRI"))


def _check_complete(path: str, info: sf.SoundFile, frames_read: int) -> None:
    """Refuse a file holding less audio than its header declares (a cut-off download or copy); see `load_audio`."""
    present_seconds = frames_read / info.samplerate
    if frames_read < info.frames and (info.format != "MP3" or _mp3_declares_length(path)):
        raise ValueError(
            f"The audio file {path} is truncated: its header declares {info.frames} frames "
            f"({info.frames / info.samplerate:.2f} s) but only {frames_read} ({present_seconds:.2f} s) could be read."
        )
    size = os.path.getsize(path)
    if info.format in ("WAV", "WAVEX", "AIFF"):
        chunk = _riff_data_chunk(path, size)
        if chunk is not None and chunk[0] > chunk[1]:
            declared, present = chunk[0], max(chunk[1], 0)
            seconds = (
                f" ({present_seconds:.2f} s of {present_seconds * declared / present:.2f} s)" if frames_read else ""
            )
            raise ValueError(
                f"The audio file {path} is truncated: its header declares {declared} bytes of audio data but only "
                f"{present} are present{seconds}."
            )
    elif info.format == "OGG" and not _ogg_is_complete(path, size):
        raise ValueError(
            f"The audio file {path} is truncated: its Ogg stream stops before the end-of-stream page "
            f"({present_seconds:.2f} s present)."
        )


def _read_file(path: str) -> tuple[np.ndarray, int]:
    if not os.path.exists(path):
        raise OSError(f"Audio file not found: {path}")
    if not os.path.isfile(path):
        raise OSError(f"Audio path is not a file: {path}")
    try:
        with sf.SoundFile(path) as handle:
            data = handle.read(dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError on undecodable files
        raise OSError(f"Could not read audio file {path}: not a readable audio file ({error}).") from error
    _check_complete(path, handle, len(data))
    return data, int(handle.samplerate)  # data is [samples, channels]


def _to_float(samples: np.ndarray) -> np.ndarray:
    dtype = samples.dtype
    if dtype == np.bool_:
        raise ValueError("Audio has a boolean dtype; expected float or int16/int32/uint8 PCM samples.")
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"Audio has a complex dtype ({dtype}); expected real float or PCM samples.")
    if np.issubdtype(dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    if dtype in _INT_SCALES:
        offset, scale = _INT_SCALES[dtype]
        return ((samples.astype(np.float64) - offset) / scale).astype(np.float32)
    raise ValueError(
        f"Audio has an unsupported dtype ({dtype}); expected float, int8/int16/int32 or uint8 PCM samples."
    )


def _downmix(samples: np.ndarray) -> np.ndarray:
    """1-D → as is; 2-D → average over the channel axis, the short one (≤ `MAX_CHANNELS`)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise ValueError(
            f"Audio has {samples.ndim} dimensions (shape {tuple(samples.shape)}); expected 1-D mono or 2-D "
            "multichannel audio."
        )
    rows, cols = samples.shape
    if rows <= MAX_CHANNELS and (cols > MAX_CHANNELS or rows < cols):
        channel_axis = 0
    elif cols <= MAX_CHANNELS and (rows > MAX_CHANNELS or cols < rows):
        channel_axis = 1
    elif rows > MAX_CHANNELS and cols > MAX_CHANNELS:
        raise ValueError(
            f"Audio of shape {tuple(samples.shape)} has no channel axis: one axis of 2-D audio must have at most "
            f"{MAX_CHANNELS} channels."
        )
    else:
        raise ValueError(f"Audio of shape {tuple(samples.shape)} has an ambiguous channel layout.")
    return samples.mean(axis=channel_axis, dtype=np.float64).astype(np.float32)


def load_audio(
    source: Any,
    sampling_rate: int | None = None,
    target_rate: int = DEFAULT_SAMPLING_RATE,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """
    Load and validate one audio clip and return it as a 1-D float32 mono waveform at `target_rate` Hz.

    Args:
        source: one of
            - a file path (`str` / `os.PathLike`), read with soundfile; the file header's sample rate is used
              (`sampling_rate` is ignored for files);
            - a numpy array or torch tensor: 1-D mono, or 2-D multichannel in `[channels, samples]` or
              `[samples, channels]` layout (the channel axis is the short one, ≤ 8), downmixed by averaging.
              Float samples are kept as is; int8/int16/int32/uint8 PCM is scaled to [-1, 1];
            - a dict `{"array": ..., "sampling_rate": ...}` (e.g. a 🤗 Datasets `Audio` row), or `{"path": ...}`.
        sampling_rate: sample rate of an array source; required for arrays (unless the dict provides it).
        target_rate: output sample rate; other rates are resampled with `scipy.signal.resample_poly`.
        max_seconds: longest accepted clip (`None`: no limit). Longer clips are refused, never truncated.

    A file holding less audio than its header declares (a cut-off download or copy) is refused, never read as if
    whole: a WAV or AIFF file whose sample-data chunk is shorter than its declared size, an Ogg (Vorbis / Opus) file
    whose last page is cut or lacks the end-of-stream flag, and any file of which fewer frames decode than its header
    declares (e.g. an MP3 with a Xing / Info header). A cut FLAC file fails to decode and is refused as unreadable.
    Files that declare no length (an MP3 without such a header, a WAV whose data size is left unknown) are not checked.

    Raises:
        OSError: missing or unreadable file.
        ValueError: truncated file; missing sample rate, empty / non-finite / silent / too long audio, > 2-D, bool or
            complex dtype.
        TypeError: unsupported source type.
    """
    target_rate = _check_rate(target_rate, "target_rate")
    origin = "audio"

    if isinstance(source, Mapping):
        if "array" in source and source["array"] is not None:
            dict_rate = source.get("sampling_rate")
            if dict_rate is not None and sampling_rate is not None and int(dict_rate) != int(sampling_rate):
                raise ValueError(
                    f"The audio dict says sampling_rate={dict_rate} but sampling_rate={sampling_rate} was passed."
                )
            sampling_rate = dict_rate if dict_rate is not None else sampling_rate
            source = source["array"]
        elif source.get("path") is not None:
            source = source["path"]
        else:
            raise ValueError("An audio dict needs an 'array' (with 'sampling_rate') or a 'path' entry.")

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        samples, rate = _read_file(path)
        origin = f"audio file {path}"
        if samples.size == 0:
            raise ValueError(f"The {origin} is empty (no samples).")
        samples = samples.mean(axis=1, dtype=np.float64).astype(np.float32) if samples.shape[1] > 1 else samples[:, 0]
    elif isinstance(source, (np.ndarray, np.generic)) or type(source).__module__.startswith("torch"):
        samples = _to_numpy(source)
        if samples.ndim == 0 or samples.ndim > 2:
            raise ValueError(
                f"Audio has {samples.ndim} dimensions (shape {tuple(samples.shape)}); expected 1-D mono or 2-D "
                "multichannel audio."
            )
        samples = _to_float(samples)
        if samples.size == 0:
            raise ValueError(f"The audio is empty (shape {tuple(samples.shape)}).")
        if sampling_rate is None:
            raise ValueError(
                "The sampling rate is needed for array audio: pass `sampling_rate=` (or a dict with 'array' and "
                "'sampling_rate')."
            )
        rate = _check_rate(sampling_rate, "sampling_rate")
        samples = _downmix(samples)
    else:
        raise TypeError(
            f"Unsupported audio input of type {type(source).__name__}: expected a file path, a numpy array, a torch "
            "tensor or a dict with 'array' and 'sampling_rate'."
        )

    if not np.all(np.isfinite(samples)):
        raise ValueError(f"The {origin} contains NaN or infinite samples.")
    duration = samples.shape[0] / rate
    if max_seconds is not None and duration > max_seconds:
        raise ValueError(
            f"The {origin} is too long: {duration:.2f} s, but at most {max_seconds:g} s is accepted (clips are "
            "never truncated; split it into shorter clips)."
        )
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        raise ValueError(f"The {origin} is silent (peak amplitude {peak:.2e} < {SILENCE_PEAK:g}).")

    if rate != target_rate:
        divisor = math.gcd(rate, target_rate)
        samples = resample_poly(samples.astype(np.float64), target_rate // divisor, rate // divisor)
    return np.ascontiguousarray(samples, dtype=np.float32)


__all__ = ["DEFAULT_MAX_SECONDS", "DEFAULT_SAMPLING_RATE", "load_audio"]
