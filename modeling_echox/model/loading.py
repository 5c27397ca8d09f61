"""Load a local EchoX checkpoint directory (model + processor) with a clear error for anything missing or damaged."""

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from .configuration_echox import EchoXConfig
from .modeling_echox import EchoXForSpeechToSpeech
from .processing_echox import EchoXProcessor
from .quantization import quantize_int8
from .unit_vocabulary import UNIT_VOCAB_FILE

_REQUIRED = ("config.json", "processor_config.json", "tokenizer.json", UNIT_VOCAB_FILE)


def check_checkpoint_dir(path: str) -> None:
    """
    Raise `OSError` naming every file a complete EchoX checkpoint directory lacks, including missing weight shards, or
    the first weight file that is not a whole safetensors file (e.g. cut short by an interrupted copy).
    """
    if not os.path.isdir(path):
        raise OSError(f"EchoX checkpoint directory not found: {path}")
    missing = [name for name in _REQUIRED if not os.path.isfile(os.path.join(path, name))]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise OSError(f"{index} is not a valid safetensors index ({type(error).__name__}: {error}).") from error
    else:
        shards = ["model.safetensors"]
    missing += [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
    if missing:
        raise OSError(f"The EchoX checkpoint in {path} is incomplete; missing: {', '.join(missing)}")
    for shard in shards:
        weights = os.path.join(path, shard)
        try:  # reads and checks the header only: a file shorter than its header declares is refused here
            with safe_open(weights, framework="pt"):
                pass
        except SafetensorError as error:
            raise OSError(f"The EchoX weights file {weights} is damaged or truncated ({error}).") from error


def _parse(load, path: str, what: str):
    """`load(path)`, a failure to parse the checkpoint's `what` re-raised as one `OSError` naming it."""
    try:
        return load(path)
    except Exception as error:  # transformers, tokenizers and huggingface_hub raise many types on a malformed file
        name = type(error).__name__
        raise OSError(f"The EchoX checkpoint in {path} has a damaged {what} ({name}: {error}).") from error


def load_echox(path: str, dtype: torch.dtype | None = None, device: str | None = None, int8: bool = False):
    """
    `(model, processor)` from a local checkpoint directory, the model in eval mode; `int8`: quantize it for CPU
    inference (`quantize_int8`).

    Raises:
        OSError: a missing, truncated or unparsable checkpoint file (the weights, config.json, the processor's files).
        ValueError: a weight holding NaN or infinite values (`EchoXForSpeechToSpeech.check_finite_weights`).
    """
    check_checkpoint_dir(path)
    config = _parse(EchoXConfig.from_pretrained, path, "config.json")
    processor = _parse(EchoXProcessor.from_pretrained, path, "processor (its config, tokenizer or unit vocabulary)")
    try:
        model = EchoXForSpeechToSpeech.from_pretrained(path, config=config, dtype=dtype)
    except RuntimeError as error:  # transformers refuses weights whose shapes do not match the config with it
        raise OSError(f"The weights of the EchoX checkpoint in {path} do not fit its config.json ({error})") from error
    if device is not None:
        model = model.to(device)
    model.eval()
    if int8:
        quantize_int8(model)
    return model, processor
