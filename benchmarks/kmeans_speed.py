"""Measure k-means fitting speed on this CPU: scikit-learn MiniBatchKMeans vs faiss vs EchoX's pure-torch Lloyd.

Synthetic speech-encoder-like data (a Gaussian mixture in the Whisper tiny width, 384). Prints one JSON object.
Usage: python benchmarks/kmeans_speed.py [--frames 60000] [--dim 384] [--k 500] [--threads 2]
       [--backends sklearn:100,sklearn:20,faiss:20,faiss:20:random,faiss:100,torch:50]   (backend:iterations[:init])
sklearn = MiniBatchKMeans with fairseq's learn_kmeans.py settings (batch 10000, n_init 1 here); its iterations are
epochs over the data. faiss / torch iterations are full Lloyd iterations; faiss and torch are seeded with greedy
k-means++ on 4·k frames (faiss:…:random = faiss's own random seeding).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_echox.units.kmeans import assign_units, fit_kmeans  # noqa: E402


def make_data(frames: int, dim: int, modes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(modes, dim)).astype(np.float32) * 3.0
    labels = rng.integers(0, modes, size=frames)
    return (centers[labels] + rng.normal(size=(frames, dim)).astype(np.float32)).astype(np.float32)


def inertia(features: np.ndarray, centroids: torch.Tensor) -> float:
    x = torch.from_numpy(features)
    units = assign_units(x, centroids)
    return float(((x - centroids[units]) ** 2).sum(dim=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="sklearn:100,sklearn:20,faiss:20,faiss:20:random,faiss:100,torch:50")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    features = make_data(args.frames, args.dim, modes=2 * args.k)
    result = {
        "frames": args.frames,
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "backends": {},
    }
    for spec in args.backends.split(","):
        backend, iterations, init = (spec.split(":") + ["", ""])[:3]
        max_iter = int(iterations) if iterations else None
        options = {"init": init} if init else {}
        try:
            start = time.perf_counter()
            kmeans = fit_kmeans(features, args.k, backend=backend, max_iter=max_iter, seed=0, num_threads=args.threads,
                                **options)
            seconds = time.perf_counter() - start
        except ImportError as error:
            result["backends"][spec] = {"error": str(error)}
            continue
        result["backends"][spec] = {
            "fit_seconds": round(seconds, 2),
            "mean_squared_distance": round(inertia(features, kmeans.centroids), 3),
        }
    x = torch.from_numpy(features)
    centroids = torch.from_numpy(features[: args.k]).clone()
    start = time.perf_counter()
    assign_units(x, centroids)
    seconds = time.perf_counter() - start
    result["torch_assign_frames_per_second"] = round(args.frames / seconds)
    result["torch_assign_seconds_per_hour_of_audio"] = round(seconds * (50 * 3600) / args.frames, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
