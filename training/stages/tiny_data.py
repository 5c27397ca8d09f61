"""
A handful of synthetic spoken dialogues for smoke runs and tests: questions spoken with flite (`-voice slt`) when it
is installed, else distinct tone/noise patterns; responses with deterministic unit-language targets (each word maps to
a few unit indices, so a text-to-codec decoder can learn them).

    python -m training.stages.tiny_data --out runs/tiny_data --num-units 64
"""

import argparse
import hashlib
import os
import shutil
import subprocess

import numpy as np
import soundfile as sf

from .data import write_manifest

DIALOGUES = [
    ("what is the capital of kenya", "the capital of kenya is nairobi."),
    ("which day comes after sunday", "monday comes after sunday."),
    ("how many legs does a cat have", "a cat has four legs."),
    ("what colour is the sky", "the sky is blue."),
    ("name a large animal", "an elephant is large."),
    ("what do bees make", "bees make honey."),
    ("what is two plus two", "two plus two is four."),
    ("where does the sun rise", "the sun rises in the east."),
]
SR = 16000


def word_units(word: str, num_units: int, per_word: int = 3) -> list[int]:
    digest = hashlib.sha256(word.encode()).digest()
    return [digest[i] % num_units for i in range(per_word)]


def text_units(text: str, num_units: int) -> list[int]:
    return [u for word in text.replace(".", " .").split() for u in word_units(word, num_units)]


def synthesize(text: str, path: str, index: int, use_flite: bool | None = None) -> str:
    """Speak `text` into a 16 kHz wav (flite, else a deterministic tone pattern)."""
    if use_flite is None:
        use_flite = shutil.which("flite") is not None
    if use_flite:
        raw = path + ".raw.wav"
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", raw], check=True, capture_output=True)
        from modeling_echox.model.audio_io import load_audio

        wave = load_audio(raw, target_rate=SR)
        os.remove(raw)
    else:
        rng = np.random.default_rng(index)
        t = np.arange(int((0.8 + 0.1 * (index % 5)) * SR)) / SR
        wave = 0.1 * np.sin(2 * np.pi * (180 + 40 * index) * t) + 0.01 * rng.standard_normal(t.shape)
    sf.write(path, np.asarray(wave, dtype=np.float32), SR)
    return path


def make_tiny_dataset(out_dir: str, num_units: int = 64, count: int = 8, use_flite: bool | None = None) -> str:
    """Write `count` clips and `train.jsonl` (with whole and per-sentence-part segment targets); returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for index in range(count):
        question, answer = DIALOGUES[index % len(DIALOGUES)]
        wav = synthesize(question, os.path.join(out_dir, f"q{index:03d}.wav"), index, use_flite)
        words = answer.split()
        half = max(1, len(words) // 2)
        parts = [" ".join(words[:half]), " " + " ".join(words[half:])]
        records.append(
            {
                "id": f"tiny{index:03d}",
                "audio": os.path.basename(wav),
                "transcript": question,
                "prompt": "",
                "response": answer,
                "units": text_units(answer, num_units),
                "segments": [[part, text_units(part, num_units)] for part in parts],
            }
        )
    return write_manifest(os.path.join(out_dir, "train.jsonl"), records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-units", type=int, default=64)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--tones", action="store_true", help="tone patterns instead of flite speech")
    args = parser.parse_args()
    print(make_tiny_dataset(args.out, args.num_units, args.count, False if args.tones else None))
