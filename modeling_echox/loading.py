"""Load a local EchoX checkpoint directory (model + processor) with a clear error for anything missing."""

import json
import os

import torch

from .modeling_echox import EchoXForSpeechToSpeech
from .processing_echox import EchoXProcessor
from .quantization import quantize_int8
from .unit_vocabulary import UNIT_VOCAB_FILE

_REQUIRED = ("config.json", "processor_config.json", "tokenizer.json", UNIT_VOCAB_FILE)


def check_checkpoint_dir(path: str) -> None:
    """Raise `OSError` naming every file a complete EchoX checkpoint directory lacks, including missing weight shards."""
    if not os.path.isdir(path):
        raise OSError(f"EchoX checkpoint directory not found: {path}")
    missing = [name for name in _REQUIRED if not os.path.isfile(os.path.join(path, name))]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        missing += [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
    elif not os.path.isfile(os.path.join(path, "model.safetensors")):
        missing.append("model.safetensors")
    if missing:
        raise OSError(f"The EchoX checkpoint in {path} is incomplete; missing: {', '.join(missing)}")


def load_echox(path: str, dtype: torch.dtype | None = None, device: str | None = None, int8: bool = False):
    """
    `(model, processor)` from a local checkpoint directory, the model in eval mode; `int8`: quantize it for CPU
    inference (`quantize_int8`).
    """
    check_checkpoint_dir(path)
    model = EchoXForSpeechToSpeech.from_pretrained(path, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    if int8:
        quantize_int8(model)
    return model, EchoXProcessor.from_pretrained(path)
