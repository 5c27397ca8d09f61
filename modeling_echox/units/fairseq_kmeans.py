"""
[`load_fairseq_kmeans_centroids`] imports fairseq's `km.bin` (a joblib/pickle dump of a scikit-learn k-means) with a
restricted unpickler that can only build numpy arrays and inert stand-ins for the k-means object: no code from the
file is ever run.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import zlib

import numpy as np

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
