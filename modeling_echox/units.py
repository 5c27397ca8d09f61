"""
Acoustic units for EchoX: speech encoder features → k-means → frame-level unit ids (50 Hz) → run-length dedup.

- [`EchoXUnitExtractor`] reads a chosen layer of any transformers speech encoder (`WhisperEncoder` / `WhisperModel`,
  or waveform encoders such as `HubertModel` / `Wav2Vec2Model`) and assigns each frame to its nearest centroid.
- [`fit_kmeans`] fits the centroids (scikit-learn MiniBatchKMeans, faiss, or a pure-torch Lloyd fallback); the result
  is an [`EchoXUnitKMeans`], saved as `unit_kmeans.safetensors` + `unit_kmeans.json`.
- [`EchoXUnitKMeans.from_fairseq`] imports fairseq's `km.bin` (a joblib/pickle dump of a scikit-learn k-means) with a
  restricted unpickler that can only build numpy arrays and inert stand-ins for the k-means object: no code from the
  file is ever run.

Assignment ([`assign_units`]) is pure torch, so inference needs neither scikit-learn nor faiss.
"""

from __future__ import annotations

import bz2
import gzip
import inspect
import io
import json
import lzma
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

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


# ---------------------------------------------------------------------------------------------------- fairseq import
_EXPORT_HINT = (
    "To import it anyway, export the centroids as a plain .npy file in an environment where you trust the file, e.g. "
    "`python -c \"import joblib, numpy; numpy.save('centroids.npy', joblib.load('km.bin').cluster_centers_)\"`, then "
    "use `EchoXUnitKMeans.from_numpy('centroids.npy', layer=...)`."
)


class _InertObject:
    """Stand-in for a pickled scikit-learn estimator: only stores the state it is given; runs no code of its own."""

    _pickled_class = ""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self._pickled_class}: {type(state).__name__}")
        self.__dict__.update(state)


def _inert_class(module: str, name: str) -> type:
    return type(name, (_InertObject,), {"_pickled_class": f"{module}.{name}"})


class _ArrayWrapper:
    """Stand-in for joblib's `NumpyArrayWrapper`: the array's bytes follow the pickled wrapper in the stream."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("bad joblib array wrapper state")
        self.__dict__.update(state)

    def read(self, handle) -> np.ndarray:
        dtype = self.__dict__.get("dtype")
        shape = self.__dict__.get("shape")
        if not isinstance(dtype, np.dtype) or not isinstance(shape, tuple):
            raise pickle.UnpicklingError("bad joblib array wrapper state")
        if dtype.hasobject:
            raise pickle.UnpicklingError("the file holds an array of Python objects, which would need arbitrary code")
        if self.__dict__.get("numpy_array_alignment_bytes") is not None:
            padding = handle.read(1)
            if len(padding) != 1:
                raise pickle.UnpicklingError("truncated joblib file")
            handle.read(int.from_bytes(padding, "little"))
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        data = handle.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise pickle.UnpicklingError("truncated joblib file")
        array = np.frombuffer(data, dtype=dtype, count=count).copy()
        if self.__dict__.get("order") == "F":
            return array.reshape(shape[::-1]).transpose()
        return array.reshape(shape)


def _numpy_core():
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _safe_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, _InertObject)) or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor is only allowed for the k-means object")
    return cls.__new__(cls)


def _safe_latin1_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("codecs.encode is only allowed for latin-1 array bytes")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so BUILD can be intercepted
    """Builds only numpy arrays/dtypes/scalars, plain containers and inert stand-ins for scikit-learn k-means."""

    _ESTIMATORS = {"MiniBatchKMeans", "KMeans"}

    def find_class(self, module: str, name: str):
        multiarray, numeric = _numpy_core()
        numpy_modules = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
        if module in numpy_modules and name == "_reconstruct":
            return multiarray._reconstruct
        if module in numpy_modules and name == "scalar":
            return multiarray.scalar
        if module in numpy_modules and name == "_frombuffer":
            return numeric._frombuffer
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module.startswith("numpy.dtypes") and name.endswith("DType") and hasattr(np.dtypes, name):
            return getattr(np.dtypes, name)  # numpy ≥ 1.25 pickles dtypes by their class
        if module == "joblib.numpy_pickle" and name == "NumpyArrayWrapper":
            return _ArrayWrapper
        if module.startswith("sklearn.cluster") and name in self._ESTIMATORS:
            return _inert_class(module, name)
        if module in ("_codecs", "codecs") and name == "encode":
            return _safe_latin1_encode  # protocol-2 pickles carry array bytes as latin-1 text
        if module == "copyreg" and name == "_reconstructor":
            return _safe_reconstructor
        if module in ("builtins", "__builtin__") and name == "object":
            return object
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from the pickle")

    def load_build(self):
        if len(self.stack) >= 2 and isinstance(self.stack[-2], type):  # would set attributes on a class itself
            raise pickle.UnpicklingError("setting the state of a class is not allowed")
        super().load_build()
        if isinstance(self.stack[-1], _ArrayWrapper):
            self.stack.append(self.stack.pop().read(self._file))

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def __init__(self, handle):
        super().__init__(handle)
        self._file = handle


def _decompress_if_needed(raw: bytes) -> bytes:
    if raw.startswith(b"ZF"):
        raise ValueError("This is a joblib file from before joblib 0.9.3 (zfile format), which is not supported.")
    if raw.startswith(b"\x1f\x8b"):
        return gzip.decompress(raw)
    if raw.startswith(b"BZ"):
        return bz2.decompress(raw)
    if raw.startswith(b"\xfd7zXZ") or raw.startswith(b"\x5d\x00"):
        return lzma.decompress(raw)
    if raw.startswith(b"\x04\x22\x4d\x18"):
        raise ValueError("This joblib file is lz4-compressed, which is not supported; re-save it uncompressed.")
    if raw[:1] == b"\x78":
        return zlib.decompress(raw)
    return raw


def load_fairseq_kmeans_centroids(path: str | os.PathLike) -> np.ndarray:
    """
    `cluster_centers_` (`[K, D]` float32) of a joblib/pickle dump of a scikit-learn (MiniBatch)KMeans, read without
    running any code from the file: only numpy arrays/dtypes/scalars, joblib's array wrapper and an inert stand-in for
    the k-means class may be built. Anything else (any other class or callable) is refused with a `ValueError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OSError(f"k-means file not found: {path}")
    with open(path, "rb") as handle:
        raw = _decompress_if_needed(handle.read())
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"Refusing to load {path}: {error}. Only a scikit-learn k-means dump can be read. "
                         + _EXPORT_HINT) from error
    except (EOFError, KeyError, TypeError, AttributeError, IndexError) as error:
        message = f"Could not read {path} as a joblib/pickle k-means file ({error!r}). "
        raise ValueError(message + _EXPORT_HINT) from error
    centers = obj.__dict__.get("cluster_centers_") if isinstance(obj, _InertObject) else None
    if isinstance(obj, np.ndarray):  # a bare pickled centroid matrix
        centers = obj
    if not isinstance(centers, np.ndarray) or centers.ndim != 2 or not np.issubdtype(centers.dtype, np.floating):
        raise ValueError(f"{path} holds no fitted k-means (no 2-D float `cluster_centers_`). " + _EXPORT_HINT)
    return np.ascontiguousarray(centers, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- extractor
def _check_clip(audio: Any, index: int | None = None) -> np.ndarray:
    where = "audio" if index is None else f"audio[{index}]"
    if isinstance(audio, torch.Tensor):
        if not audio.is_floating_point():
            raise ValueError(f"{where} must be floating point in [-1, 1], got dtype {audio.dtype}; convert integer "
                             "PCM first (e.g. int16 / 32768) or use modeling_echox.audio_io.load_audio.")
        array = audio.detach().to("cpu", torch.float32).numpy()
    elif isinstance(audio, np.ndarray):
        if not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"{where} must be floating point in [-1, 1], got dtype {audio.dtype}; convert integer "
                             "PCM first (e.g. int16 / 32768) or use modeling_echox.audio_io.load_audio.")
        array = audio.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{where} must be a 1-D numpy array or torch tensor of 16 kHz samples, got "
                         f"{type(audio).__name__}.")
    if array.ndim != 1:
        raise ValueError(f"{where} must be 1-D mono samples, got shape {array.shape}; average or pick a channel first.")
    if array.size == 0:
        raise ValueError(f"{where} is empty.")
    if not np.isfinite(array).all():
        raise ValueError(f"{where} contains NaN or infinite samples.")
    return array


def _num_layers(config) -> int:
    for name in ("encoder_layers", "num_hidden_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot tell how many layers a {type(config).__name__} encoder has.")


class EchoXUnitExtractor:
    """
    Speech → acoustic units with a transformers speech encoder and k-means centroids.

    Args:
        encoder: a transformers speech model. Mel-input encoders (`WhisperEncoder`, or a `WhisperModel` /
            `WhisperForConditionalGeneration`, whose encoder is used) are run window by window (30 s for Whisper)
            and their output is trimmed to the clip's real frame count; waveform encoders (`HubertModel`,
            `Wav2Vec2Model`, … taking `input_values`) see the whole clip.
        kmeans: the [`EchoXUnitKMeans`] (may be given later, e.g. by [`fit_kmeans`]).
        layer: hidden-state index (`output_hidden_states`): 0 = the input of the first Transformer layer, `i` = the
            output of layer `i`; negative values count from the end (-1 = last layer, which for Whisper is the
            final-LayerNorm output). Defaults to the k-means' recorded layer, else -1.
        feature_extractor: turns 16 kHz audio into the encoder's input; default `WhisperFeatureExtractor` sized to
            the encoder for Whisper, `Wav2Vec2FeatureExtractor(do_normalize=feat_extract_norm == "layer")` otherwise
            (pass your checkpoint's own feature extractor when it differs).
    """

    def __init__(self, encoder, kmeans: EchoXUnitKMeans | None = None, layer: int | None = None,
                 feature_extractor=None):
        if not isinstance(encoder, torch.nn.Module) or not hasattr(encoder, "config"):
            raise ValueError(f"encoder must be a transformers model, got {type(encoder).__name__}.")
        if getattr(encoder.config, "model_type", None) == "whisper" and hasattr(encoder, "get_encoder"):
            encoder = encoder.get_encoder()
        self.encoder = encoder.eval()
        parameters = inspect.signature(encoder.forward).parameters
        if "input_features" in parameters:
            self.input_kind = "mel"
        elif "input_values" in parameters:
            self.input_kind = "waveform"
        else:
            raise ValueError(f"{type(encoder).__name__} takes neither `input_features` nor `input_values`.")
        self.num_layers = _num_layers(encoder.config)
        if layer is None:
            layer = kmeans.layer if kmeans is not None and kmeans.layer is not None else -1
        self.layer = self._check_layer(layer)
        self.feature_extractor = feature_extractor or self._default_feature_extractor()
        self.kmeans = None
        if kmeans is not None:
            self.set_kmeans(kmeans)

    # -------------------------------------------------------------- configuration
    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer must be an integer, got {layer!r}.")
        n = self.num_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(
                f"layer {layer} is out of range for a {n}-layer encoder: use 0 … {n} (or -{n + 1} … -1)."
            )
        return int(layer) % (n + 1)

    def _default_feature_extractor(self):
        config = self.encoder.config
        if self.input_kind == "mel":
            if config.model_type != "whisper":
                raise ValueError(f"Pass the feature_extractor of this {config.model_type} encoder.")
            from transformers import WhisperFeatureExtractor

            return WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        from transformers import Wav2Vec2FeatureExtractor

        return Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0,
            do_normalize=getattr(config, "feat_extract_norm", "group") == "layer", return_attention_mask=False,
        )

    @property
    def hidden_size(self) -> int:
        config = self.encoder.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @property
    def encoder_info(self) -> dict:
        config = self.encoder.config
        return {
            "model_type": config.model_type,
            "class": type(self.encoder).__name__,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "name_or_path": getattr(config, "_name_or_path", "") or "",
            "frame_rate": self.frame_rate,
        }

    @property
    def frame_rate(self) -> float:
        """Encoder frames per second (50 for Whisper, HuBERT and wav2vec 2.0)."""
        return SAMPLING_RATE / self._samples_per_frame()

    def _samples_per_frame(self) -> int:
        config = self.encoder.config
        if self.input_kind == "mel":
            return int(self.feature_extractor.hop_length * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0])
        return int(np.prod(config.conv_stride))

    def set_kmeans(self, kmeans: EchoXUnitKMeans) -> None:
        if not isinstance(kmeans, EchoXUnitKMeans):
            raise ValueError(f"kmeans must be an EchoXUnitKMeans, got {type(kmeans).__name__}.")
        if kmeans.dim != self.hidden_size:
            raise ValueError(f"The k-means centroids have dimension {kmeans.dim} but this encoder's features have "
                             f"{self.hidden_size}: they were fitted on another encoder.")
        if kmeans.layer is not None and kmeans.layer % (self.num_layers + 1) != self.layer:
            raise ValueError(f"The k-means was fitted on layer {kmeans.layer} but this extractor reads layer "
                             f"{self.layer}.")
        self.kmeans = kmeans

    # -------------------------------------------------------------- features
    def _run(self, **inputs) -> torch.Tensor:
        outputs = self.encoder(**inputs, output_hidden_states=True)
        hidden_states = outputs.hidden_states
        if hidden_states is None or len(hidden_states) != self.num_layers + 1:
            count = 0 if hidden_states is None else len(hidden_states)
            raise ValueError(f"{type(self.encoder).__name__} returned {count} hidden states, expected "
                             f"{self.num_layers + 1}.")
        return hidden_states[self.layer][0]

    @torch.inference_mode()
    def extract_features(self, audio: Any, sampling_rate: int = SAMPLING_RATE) -> torch.Tensor | list[torch.Tensor]:
        """`[frames, hidden]` float32 features of the chosen layer for one clip (a list of clips gives a list)."""
        if isinstance(audio, (list, tuple)):
            if not audio:
                raise ValueError("audio: got an empty list of clips.")
            return [self.extract_features(self._clip(clip, i), sampling_rate) for i, clip in enumerate(audio)]
        expected = getattr(self.feature_extractor, "sampling_rate", SAMPLING_RATE)
        if sampling_rate != expected:
            raise ValueError(f"sampling_rate must be {expected} Hz, got {sampling_rate}; resample first "
                             "(modeling_echox.audio_io.load_audio does it).")
        clip = _check_clip(audio)
        device = next(self.encoder.parameters()).device
        dtype = next(self.encoder.parameters()).dtype
        if self.input_kind == "mel":
            return self._whisper_features(clip, device, dtype)
        return self._waveform_features(clip, device, dtype)

    @staticmethod
    def _clip(clip, index):
        return _check_clip(clip, index)

    def _whisper_features(self, clip: np.ndarray, device, dtype) -> torch.Tensor:
        samples_per_frame = self._samples_per_frame()
        window_frames = int(self.encoder.config.max_source_positions)
        window_samples = window_frames * samples_per_frame
        parts = []
        for start in range(0, clip.size, window_samples):
            chunk = clip[start : start + window_samples]
            mel = self.feature_extractor(
                chunk, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=window_samples,
                return_tensors="pt",
            ).input_features
            hidden = self._run(input_features=mel.to(device, dtype))
            parts.append(hidden[: min(window_frames, math.ceil(chunk.size / samples_per_frame))])
        return torch.cat(parts).float().cpu()

    def _waveform_features(self, clip: np.ndarray, device, dtype) -> torch.Tensor:
        lengths = getattr(self.encoder, "_get_feat_extract_output_lengths", None)
        if lengths is not None and int(lengths(torch.tensor(clip.size))) < 1:
            raise ValueError(f"audio is too short ({clip.size} samples) for this encoder's convolutional front end.")
        values = self.feature_extractor(clip, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_values
        return self._run(input_values=values.to(device, dtype)).float().cpu()

    # -------------------------------------------------------------- units
    def _require_kmeans(self) -> EchoXUnitKMeans:
        if self.kmeans is None:
            raise ValueError("This EchoXUnitExtractor has no k-means yet: fit one with `fit_kmeans` or load one.")
        return self.kmeans

    def frame_units(self, audio: Any, sampling_rate: int = SAMPLING_RATE) -> torch.LongTensor | list[torch.LongTensor]:
        """Frame-level unit ids (one per encoder frame, 50 Hz) of one clip, or a list for a list of clips."""
        kmeans = self._require_kmeans()
        features = self.extract_features(audio, sampling_rate)
        if isinstance(features, list):
            return [kmeans.assign(f) for f in features]
        return kmeans.assign(features)

    def __call__(self, audio: Any, sampling_rate: int = SAMPLING_RATE):
        """Deduplicated `(units, durations)` (int64 tensors; durations in frames) of one clip, or a list of pairs."""
        units = self.frame_units(audio, sampling_rate)
        if isinstance(units, list):
            return [deduplicate_units(u) for u in units]
        return deduplicate_units(units)

    def fit_kmeans(self, audio: Sequence[Any], k: int, **kwargs) -> EchoXUnitKMeans:
        """Extract features from `audio` (a list of clips), fit k-means ([`fit_kmeans`]) and adopt it."""
        features = self.extract_features(list(audio))
        kmeans = fit_kmeans(features, k, layer=self.layer, encoder_info=self.encoder_info, **kwargs)
        self.set_kmeans(kmeans)
        return kmeans

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Save the k-means (`unit_kmeans.safetensors` + `unit_kmeans.json`); the encoder is not saved."""
        kmeans = self._require_kmeans()
        return EchoXUnitKMeans(kmeans.centroids, layer=self.layer, encoder_info={**kmeans.encoder_info,
                                                                                 **self.encoder_info}
                               ).save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, encoder, feature_extractor=None) -> "EchoXUnitExtractor":
        """Load the k-means from `directory` and pair it with `encoder` (checked against the recorded encoder)."""
        kmeans = EchoXUnitKMeans.from_pretrained(directory)
        extractor = cls(encoder, kmeans=None, layer=-1, feature_extractor=feature_extractor)
        recorded = kmeans.encoder_info
        for key in ("model_type", "hidden_size", "num_layers"):
            if key in recorded and recorded[key] != extractor.encoder_info[key]:
                raise ValueError(f"The k-means in {os.fspath(directory)} was fitted on an encoder with {key}="
                                 f"{recorded[key]!r}, but this encoder has {key}={extractor.encoder_info[key]!r}.")
        if kmeans.layer is not None:
            extractor.layer = extractor._check_layer(kmeans.layer)
        extractor.set_kmeans(kmeans)
        return extractor


__all__ = [
    "EchoXUnitExtractor",
    "EchoXUnitKMeans",
    "assign_units",
    "available_kmeans_backends",
    "deduplicate_units",
    "fit_kmeans",
    "load_fairseq_kmeans_centroids",
]
