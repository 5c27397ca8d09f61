"""
Streamed safetensors IO for converters: [`SafetensorsFile`] reads a file's header and copies a tensor's bytes in chunks
of 64 MiB without mapping the file; [`write_sharded_safetensors`] writes tensors (copied byte for byte, or cast) into
shards of at most `max_shard_size` with their index, holding a few chunks in memory, not a shard.
"""

import json
import os
import re
import struct

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_CHUNK = 64 * 1024 * 1024


class SafetensorsFile:
    """The header of one safetensors file; tensors are read on demand, in chunks, with plain file reads."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{path} is not a safetensors file (too short).")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > 100_000_000:
                raise ValueError(f"{path} is not a safetensors file (header of {header_size} bytes).")
            try:
                header = json.loads(handle.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{path} is not a safetensors file: {error}") from error
        self.data_start = 8 + header_size
        header.pop("__metadata__", None)
        self.entries = {}
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has the unsupported dtype {info['dtype']}.")
            self.entries[name] = (info["dtype"], tuple(info["shape"]), *info["data_offsets"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def chunks(self, name: str):
        """The raw bytes of one tensor, in chunks of at most 64 MiB."""
        _, _, begin, end = self.entries[name]
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            left = end - begin
            while left:
                chunk = handle.read(min(_CHUNK, left))
                if not chunk:
                    raise ValueError(f"{self.path} is truncated (tensor {name}).")
                left -= len(chunk)
                yield chunk

    def tensor(self, name: str) -> torch.Tensor:
        data = bytearray().join(self.chunks(name))
        dtype, shape = self.dtype(name), self.shape(name)
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


def open_checkpoint(directory: str, what: str) -> dict[str, SafetensorsFile]:
    """`{key: file}` of a directory holding `model.safetensors.index.json` + shards, or one `model.safetensors`."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map.")
        files = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise OSError(f"The {what} checkpoint in {directory} lacks the shard {shard} named by its index.")
            files[shard] = SafetensorsFile(path)
        keys = {}
        for key, shard in weight_map.items():
            if key not in files[shard].entries:
                raise ValueError(f"The {what} index maps {key} to {shard}, which does not hold it.")
            keys[key] = files[shard]
        return keys
    if os.path.isfile(single_path):
        file = SafetensorsFile(single_path)
        return dict.fromkeys(file.entries, file)
    raise OSError(f"No model.safetensors.index.json or model.safetensors in the {what} directory {directory}.")


def same_bytes(a: SafetensorsFile, a_key: str, b: SafetensorsFile, b_key: str) -> bool:
    if a.entries[a_key][:2] != b.entries[b_key][:2]:
        return a.shape(a_key) == b.shape(b_key) and torch.equal(a.tensor(a_key), b.tensor(b_key).to(a.dtype(a_key)))
    # same dtype and shape: equal sizes, so the chunks line up
    return all(chunk_a == chunk_b for chunk_a, chunk_b in zip(a.chunks(a_key), b.chunks(b_key)))


def parse_size(size) -> int:
    """`5GB` → 5·10⁹ bytes, `500MiB` → 500·2²⁰ (transformers' convention); ints are bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot read the shard size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000).")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}.get(unit)
    if scale is None:
        scale = 2 ** (10 * "KMGT".index(unit[0]) + 10)
    return int(float(match.group(1)) * scale)


class ShardItem:
    """One output tensor: from a safetensors file (`source`, `source_key`) or in memory (`tensor`)."""

    def __init__(self, key, dtype, shape, source=None, source_key=None, tensor=None):
        self.key, self.dtype, self.shape = key, dtype, tuple(shape)
        self.source, self.source_key, self.tensor = source, source_key, tensor

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()

    def write(self, handle) -> None:
        if self.tensor is not None:
            tensor = self.tensor.to(self.dtype).contiguous()
            if tensor.numel():
                handle.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            return
        source_dtype = self.source.dtype(self.source_key)
        for chunk in self.source.chunks(self.source_key):  # chunks hold whole elements (64 MiB boundaries)
            if source_dtype != self.dtype:
                chunk = torch.frombuffer(bytearray(chunk), dtype=source_dtype).to(self.dtype).view(torch.uint8).numpy().tobytes()
            handle.write(chunk)


def write_sharded_safetensors(items: list[ShardItem], out_dir: str, max_shard_size: int) -> dict:
    """
    Write `items` into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_size` bytes (a tensor larger
    than that gets a shard of its own) and `model.safetensors.index.json`. Each tensor is streamed to disk on its own.
    """
    shards, current, current_size = [], [], 0
    for item in items:
        if current and current_size + item.nbytes > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += item.nbytes
    if current:
        shards.append(current)

    weight_map, total_size = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for item in shard:
            header[item.key] = {"dtype": _DTYPE_NAMES[item.dtype], "shape": list(item.shape), "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
            weight_map[item.key] = name
        total_size += offset
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        path = os.path.join(out_dir, name)
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for item in shard:
                start = handle.tell()
                item.write(handle)
                if handle.tell() - start != item.nbytes:  # pragma: no cover - guarded by the dtype/shape checks
                    raise RuntimeError(f"Wrote {handle.tell() - start} bytes for {item.key}, expected {item.nbytes}.")
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return index


def resolve_dtype(dtype) -> torch.dtype | None:
    """`dtype` (a torch dtype or its name) as a floating torch dtype; `None` stays `None` (keep each tensor's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as float16, bfloat16 or float32, got {dtype!r}.")
    return resolved
