"""
The k-means of speech units: [`EchoXUnitKMeans`] (centroids, saved as `unit_kmeans.safetensors` +
`unit_kmeans.json`), [`fit_kmeans`] (scikit-learn MiniBatchKMeans, faiss, or a pure-torch Lloyd fallback),
[`assign_units`] (nearest centroid per frame, pure torch, so inference needs neither scikit-learn nor faiss) and
[`deduplicate_units`] (run-length dedup of frame-level unit ids).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

from .fairseq_kmeans import load_fairseq_kmeans_centroids

UNIT_KMEANS_FILE = "unit_kmeans.safetensors"
UNIT_KMEANS_CONFIG_FILE = "unit_kmeans.json"
SAMPLING_RATE = 16000
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------- small helpers
def _as_float_matrix(features: Any, what: str = "features") -> torch.Tensor:
    """`[N, D]` float32 tensor from an array/tensor or a list of `[T_i, D]` arrays/tensors (concatenated)."""
    if isinstance(features, (list, tuple)):
        if not features:
            raise ValueError(f"{what}: got an empty list.")
        parts = [_as_float_matrix(part, what) for part in features]
        dims = {part.shape[1] for part in parts}
        if len(dims) != 1:
            raise ValueError(f"{what}: the arrays in the list have different feature sizes {sorted(dims)}.")
        return torch.cat(parts, dim=0)
    if isinstance(features, np.ndarray):
        if not (np.issubdtype(features.dtype, np.floating)):
            raise ValueError(f"{what} must be a floating-point array, got dtype {features.dtype}.")
        tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    elif isinstance(features, torch.Tensor):
        if not features.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got dtype {features.dtype}.")
        tensor = features.detach().to("cpu", torch.float32)
    else:
        raise ValueError(f"{what} must be a numpy array or a torch tensor, got {type(features).__name__}.")
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be 2-D [frames, dim], got shape {tuple(tensor.shape)}.")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(tensor.shape)}).")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or infinite values.")
    return tensor


def deduplicate_units(units: Any) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Run-length "dedup" of a frame-level unit sequence: `[5, 5, 5, 2, 2, 7]` → units `[5, 2, 7]`, durations
    `[3, 2, 1]` (in frames; the durations are the targets of a vocoder's duration predictor). Accepts a 1-D
    tensor, numpy array or list of ints; an empty sequence gives two empty tensors.
    """
    if isinstance(units, torch.Tensor):
        tensor = units.detach().cpu()
    else:
        tensor = torch.as_tensor(np.asarray(units))
    if tensor.ndim != 1:
        raise ValueError(f"deduplicate_units expects a 1-D sequence, got shape {tuple(tensor.shape)}.")
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise ValueError(f"deduplicate_units expects integer unit ids, got dtype {tensor.dtype}.")
    tensor = tensor.long()
    if tensor.numel() == 0:
        return tensor.new_zeros(0), tensor.new_zeros(0)
    values, counts = torch.unique_consecutive(tensor, return_counts=True)
    return values, counts


def assign_units(features: Any, centroids: torch.Tensor, chunk_size: int = 16384) -> torch.LongTensor:
    """
    Nearest-centroid (squared Euclidean) unit id of every frame, in pure torch: `argmin_k ‖c_k‖² − 2 x·c_k`.
    `features`: `[N, D]` (or `[D]`), `centroids`: `[K, D]`. Returns `[N]` int64.
    """
    centroids = torch.as_tensor(centroids)
    if centroids.ndim != 2 or centroids.shape[0] == 0:
        raise ValueError(f"centroids must be a non-empty [K, D] matrix, got shape {tuple(centroids.shape)}.")
    x = torch.as_tensor(features) if not isinstance(features, torch.Tensor) else features
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"features must be [frames, dim], got shape {tuple(x.shape)}.")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"features have dimension {x.shape[1]} but the k-means centroids have dimension {centroids.shape[1]}: "
            "the features come from a different encoder (or layer width) than the one the k-means was fitted on."
        )
    if not x.is_floating_point():
        raise ValueError(f"features must be floating point, got dtype {x.dtype}.")
    dtype = torch.float64 if (x.dtype == torch.float64 or centroids.dtype == torch.float64) else torch.float32
    c = centroids.to(x.device, dtype)
    c_sq = (c * c).sum(dim=1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        block = x[start : start + chunk_size].to(dtype)
        scores = torch.addmm(c_sq[None], block, c.T, beta=1.0, alpha=-2.0)
        out[start : start + chunk_size] = scores.argmin(dim=1)
    return out


# ---------------------------------------------------------------------------------------------------- k-means
class EchoXUnitKMeans:
    """
    k-means centroids that define the acoustic units, plus what they were fitted on: the encoder layer and a small
    description of the encoder. Saved as `unit_kmeans.safetensors` (tensor `centroids`, `[K, D]` float32) and
    `unit_kmeans.json`.
    """

    def __init__(self, centroids: Any, layer: int | None = None, encoder_info: dict | None = None):
        if not isinstance(centroids, torch.Tensor):
            centroids = np.asarray(centroids)
        tensor = _as_float_matrix(centroids, "centroids")
        self.centroids = tensor.contiguous()
        self.layer = None if layer is None else int(layer)
        self.encoder_info = dict(encoder_info or {})

    @property
    def num_units(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def __repr__(self) -> str:
        return f"EchoXUnitKMeans(num_units={self.num_units}, dim={self.dim}, layer={self.layer})"

    def assign(self, features: Any) -> torch.LongTensor:
        """Frame-level unit ids (`[N]` int64) of `[N, D]` features."""
        return assign_units(features, self.centroids)

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensor_path = os.path.join(directory, UNIT_KMEANS_FILE)
        save_file({"centroids": self.centroids.contiguous()}, tensor_path, metadata={"format": "pt"})
        config_path = os.path.join(directory, UNIT_KMEANS_CONFIG_FILE)
        config = {
            "format_version": _FORMAT_VERSION,
            "num_units": self.num_units,
            "dim": self.dim,
            "layer": self.layer,
            "encoder": self.encoder_info,
        }
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")
        return [tensor_path, config_path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "EchoXUnitKMeans":
        from safetensors.torch import load_file

        directory = os.fspath(directory)
        tensor_path = os.path.join(directory, UNIT_KMEANS_FILE)
        if not os.path.isfile(tensor_path):
            raise OSError(f"No {UNIT_KMEANS_FILE} in {directory}.")
        tensors = load_file(tensor_path)
        if "centroids" not in tensors:
            raise ValueError(f"{tensor_path} has no 'centroids' tensor (found {sorted(tensors)}).")
        config = {}
        config_path = os.path.join(directory, UNIT_KMEANS_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        kmeans = cls(tensors["centroids"], layer=config.get("layer"), encoder_info=config.get("encoder"))
        if config.get("num_units") not in (None, kmeans.num_units) or config.get("dim") not in (None, kmeans.dim):
            raise ValueError(
                f"{config_path} says {config.get('num_units')}×{config.get('dim')} centroids but {tensor_path} holds "
                f"{kmeans.num_units}×{kmeans.dim}."
            )
        return kmeans

    @classmethod
    def from_numpy(cls, source: Any, layer: int | None = None, encoder_info: dict | None = None) -> "EchoXUnitKMeans":
        """Centroids from a `[K, D]` array or a `.npy` file (read with `allow_pickle=False`)."""
        if isinstance(source, (str, os.PathLike)):
            array = np.load(os.fspath(source), allow_pickle=False)
        else:
            array = np.asarray(source)
        return cls(array, layer=layer, encoder_info=encoder_info)

    @classmethod
    def from_fairseq(
        cls, path: str | os.PathLike, layer: int | None = None, encoder_info: dict | None = None
    ) -> "EchoXUnitKMeans":
        """
        Import fairseq's k-means model (`km.bin`, written by `learn_kmeans.py` with `joblib.dump` of a scikit-learn
        `MiniBatchKMeans`). Read with [`load_fairseq_kmeans_centroids`]: a restricted unpickler, no code executed.
        The file does not record the encoder layer: pass `layer` (e.g. 11 for mHuBERT/HuBERT L11 units).
        """
        centroids = load_fairseq_kmeans_centroids(path)
        info = {"source": "fairseq km model", "file": os.path.basename(os.fspath(path))}
        info.update(encoder_info or {})
        return cls(centroids, layer=layer, encoder_info=info)


def _sklearn_kmeans(x: np.ndarray, k: int, seed: int, max_iter: int, batch_size: int, n_init: int, **options):
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        max_iter=max_iter,
        batch_size=batch_size,
        n_init=n_init,
        random_state=seed,
        reassignment_ratio=options.pop("reassignment_ratio", 0.0),
        max_no_improvement=options.pop("max_no_improvement", 100),
        tol=options.pop("tol", 0.0),
        compute_labels=False,
        **options,
    )
    model.fit(x)
    return model.cluster_centers_


def _faiss_kmeans(x: np.ndarray, k: int, seed: int, max_iter: int, n_init: int, init: str = "k-means++",
                  init_size: int | None = None, **options):
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    model = faiss.Kmeans(x.shape[1], k, niter=max_iter, nredo=n_init, seed=seed, verbose=False, **options)
    if init == "k-means++":
        generator = torch.Generator().manual_seed(seed)
        seeds = _kmeans_plus_plus(torch.from_numpy(x), k, generator, init_size or max(4 * k, 2000))
        model.train(x, init_centroids=np.ascontiguousarray(seeds.numpy()))
    elif init == "random":
        model.train(x)
    else:
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}.")
    return model.centroids


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, sample_size: int) -> torch.Tensor:
    """Greedy k-means++ seeding (best of 2 + ln k candidates per step, as scikit-learn does) on a random subsample."""
    n = x.shape[0]
    sample = x[torch.randperm(n, generator=generator)[: min(n, max(k, sample_size))]]
    norms = (sample * sample).sum(dim=1)
    trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    first = int(torch.randint(len(sample), (1,), generator=generator))
    centroids[0] = sample[first]
    closest = (norms - 2 * sample @ sample[first] + norms[first]).clamp_min(0)
    for i in range(1, k):
        if closest.sum() > 0:
            candidates = torch.multinomial(closest, trials, replacement=True, generator=generator)
        else:
            candidates = torch.randint(len(sample), (trials,), generator=generator)
        distances = (norms[candidates, None] - 2 * sample[candidates] @ sample.T + norms[None]).clamp_min(0)
        potentials = torch.minimum(closest[None], distances)
        best = int(potentials.sum(dim=1).argmin())
        centroids[i] = sample[candidates[best]]
        closest = potentials[best]
    return centroids


def _torch_kmeans(x: torch.Tensor, k: int, seed: int, max_iter: int, init_size: int | None = None,
                  tol: float = 1e-4):
    """Lloyd's algorithm after greedy k-means++ seeding on a subsample; empty clusters are re-seeded."""
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(x, k, generator, init_size or max(4 * k, 2000))
    previous = math.inf
    for _ in range(max_iter):
        labels = assign_units(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        distances = ((x - centroids[labels]) ** 2).sum(dim=1)
        if empty.any():  # re-seed empty clusters with the worst-served frames
            worst = distances.topk(int(empty.sum())).indices
            centroids[empty] = x[worst]
        inertia = float(distances.mean())
        if not empty.any() and previous - inertia <= tol * max(previous, 1e-12) and math.isfinite(previous):
            break
        previous = inertia
    return centroids


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def available_kmeans_backends() -> list[str]:
    """
    Usable k-means fitting backends, fastest first as measured by `benchmarks/kmeans_speed.py` on a 2-core CPU
    (60k × 384 frames, k=500): faiss ≈ 16 s, torch ≈ 22 s, scikit-learn MiniBatchKMeans 150–310 s.
    """
    faiss = ["faiss"] if _installed("faiss") else []
    return faiss + ["torch"] + (["sklearn"] if _installed("sklearn.cluster") else [])


def fit_kmeans(
    features: Any,
    k: int,
    *,
    backend: str = "auto",
    max_iter: int | None = None,
    batch_size: int = 10000,
    n_init: int = 1,
    seed: int = 0,
    num_threads: int | None = None,
    layer: int | None = None,
    encoder_info: dict | None = None,
    **backend_options,
) -> EchoXUnitKMeans:
    """
    Fit k-means centroids on `[N, D]` frame features (or a list of `[T_i, D]`, one per clip).

    Args:
        k: number of units (clusters); must not exceed the number of frames.
        backend: `"faiss"` (`faiss.Kmeans`: Lloyd on a subsample of at most 256·k frames — faiss's default — seeded
            by greedy k-means++ on 4·k frames, or faiss's random seeding with `init="random"`),
            `"sklearn"` (`MiniBatchKMeans` with fairseq's `learn_kmeans.py` settings: k-means++, tol 0,
            reassignment 0, max_no_improvement 100), `"torch"` (greedy k-means++ then Lloyd, no extra dependency),
            or `"auto"`: faiss if installed, else torch (measured: faiss ≈ 16 s, torch ≈ 22 s, sklearn 150–310 s,
            for 60k × 384 frames, k=500, 2 cores; sklearn's mean squared distance was ~1.6 % lower).
        max_iter: iterations (faiss/torch: Lloyd iterations, default 20/50; sklearn: epochs, default 100).
        batch_size: MiniBatchKMeans batch size (sklearn only).
        n_init: restarts (sklearn `n_init`, faiss `nredo`; ignored by torch).
        num_threads: cap on CPU threads while fitting (default: leave as is).
        layer, encoder_info: recorded in the returned [`EchoXUnitKMeans`].
        backend_options: passed to the backend (`MiniBatchKMeans(...)` / `faiss.Kmeans(...)`).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    k = int(k)
    x = _as_float_matrix(features)
    if k > x.shape[0]:
        raise ValueError(f"k={k} is larger than the number of frames ({x.shape[0]}): give more audio or a smaller k.")
    if backend == "auto":
        backend = available_kmeans_backends()[0]
    if backend not in ("sklearn", "faiss", "torch"):
        raise ValueError(f"Unknown k-means backend {backend!r}: use 'auto', 'faiss', 'sklearn' or 'torch'.")
    if backend != "torch" and backend not in available_kmeans_backends():
        package = {"faiss": "faiss-cpu", "sklearn": "scikit-learn"}[backend]
        raise ImportError(f"k-means backend {backend!r} needs `pip install {package}` (or use backend='torch').")
    previous_threads = torch.get_num_threads()
    limiter = None
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if backend == "sklearn":
            try:
                from threadpoolctl import threadpool_limits

                limiter = threadpool_limits(num_threads) if num_threads is not None else None
            except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
                pass
            centroids = _sklearn_kmeans(
                x.numpy(), k, seed, max_iter or 100, batch_size, n_init, **backend_options
            )
        elif backend == "faiss":
            import faiss

            if num_threads is not None:
                faiss.omp_set_num_threads(num_threads)
            centroids = _faiss_kmeans(x.numpy(), k, seed, max_iter or 20, n_init, **backend_options)
        else:
            centroids = _torch_kmeans(x, k, seed, max_iter or 50, **backend_options)
    finally:
        if limiter is not None:
            limiter.unregister()
        torch.set_num_threads(previous_threads)
    return EchoXUnitKMeans(torch.as_tensor(np.asarray(centroids, dtype=np.float32)), layer=layer,
                           encoder_info=encoder_info)
