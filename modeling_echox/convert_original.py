"""Converts a released EchoX checkpoint (EchoX-8B / EchoX-3B: sharded safetensors of `EchoXForCausalLM`, its tokenizer
and the fairseq unit vocoder), together with the separate Whisper-large-v3 directory, to an [`EchoXForSpeechToSpeech`]
checkpoint directory (sharded safetensors, config, generation config, processor files and the model code).

    echox convert-original --echox EchoX-8B --whisper whisper-large-v3 --out echox-8b-hf

Tensors are streamed: each one is copied byte for byte (or cast, with `dtype`) in chunks of 64 MiB from its input
file into the output shard being written, so the conversion holds a few chunks in memory, not a shard, and maps no
input file. Every original tensor lands unchanged in exactly one tensor of ours; the echo decoder's text table (tied to the
LLM's `lm_head` in training) is stored once, as `language_model.lm_head.weight`.
"""

import json
import logging
import os
import re
import struct

import torch
from transformers import AutoTokenizer, LlamaConfig, WhisperConfig, WhisperFeatureExtractor
from transformers.dynamic_module_utils import custom_object_save

from .configuration_echox import EchoXConfig
from .convert_fairseq_vocoder import convert_fairseq_vocoder
from .generation_configuration_echox import EchoXGenerationConfig
from .modeling_echox import EchoXForSpeechToSpeech
from .processing_echox import EchoXProcessor
from .unit_vocabulary import EchoXUnitVocabulary

logger = logging.getLogger(__name__)

AUDIO_TOKEN = "<audio_patch>"
EOT_TOKEN = "<|eot_id|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
UNIT_TOKEN = re.compile(r"^<\|unit_(.+)\|>$")
# Documented defaults of the released (Llama-3) EchoX; the converter reads the real ids from the tokenizer.
RELEASED_EOT_ID = 128009
PREFIX_QUIRK_ID = 12800  # the id the released inference code appends to every echo-decoder prefix (a typo of 128000)
ECHO_MAX_POSITIONS = 2048
VOCODER_CHECKPOINT = "g_00500000"
VOCODER_CONFIG = "vocoder_config.json"

# Fields of the original `config.json` that are EchoX's, not the LLM's.
ECHOX_ONLY_FIELDS = {
    "audio_tower",
    "adapter_size",
    "audio_token_len",
    "unit_output",
    "unit_vocab_size",
    "unit_model",
    "unit_vocab",
    "architectures",
    "auto_map",
    "model_type",
    "_name_or_path",
    "transformers_version",
}

# Original (`EchoXForCausalLM`) key prefix → ours. The T2U text table is handled apart (see `convert_original`).
KEY_RENAMES = [
    ("model.mm_projector1.", "speech_adapter.projector."),
    ("model.asr_transformer_encoder.layers.0.", "speech_adapter.frame_block."),
    ("model.out_norm.", "speech_adapter.out_norm."),
    ("model.audio_feature_head.", "speech_adapter.ctc_head."),
    ("model.lbm.encoder_attn.", "speech_adapter.look_back."),
    ("model.lbm.atten_layer_norm.", "speech_adapter.look_back_norm."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
    ("unit_translator.aligner_MLP.", "echo_decoder.denoiser."),
    ("unit_translator.unit_embedding.", "echo_decoder.unit_embedding."),
    ("unit_translator.adapter.", "echo_decoder.projection."),
    ("unit_translator.model.layers.", "echo_decoder.decoder.layers."),
    ("unit_translator.model.norm.", "echo_decoder.decoder.norm."),
    ("unit_translator.lm_head.", "echo_decoder.lm_head."),
]
LM_HEAD = "lm_head.weight"
T2U_TEXT_TABLE = "unit_translator.model.embed_tokens.weight"
LLM_EMBED = "model.embed_tokens.weight"
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Echo decoder ("T2U") size presets of the original, by `config.unit_model`: (layers, hidden, heads, kv heads, FFN);
# `None` = the LLM's value. Any other string gives the released "medium" decoder; no `unit_model` gives the last row.
UNIT_MODEL_PRESETS = {
    "large": (2, None, None, None, None),
    "small": (4, 512, 8, None, 2048),
    "tiny": (4, 512, 8, None, 2048),  # the name of "small" before the original renamed it
}
UNIT_MODEL_DEFAULT = (8, 768, 12, 12, 2048)
UNIT_MODEL_ABSENT = (6, 512, 8, None, 2048)

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


# ----------------------------------------------------------------------------------------------------- safetensors IO
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


def _same_bytes(a: SafetensorsFile, a_key: str, b: SafetensorsFile, b_key: str) -> bool:
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


class _Item:
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


def write_sharded_safetensors(items: list[_Item], out_dir: str, max_shard_size: int) -> dict:
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


# ---------------------------------------------------------------------------------------------------------- mapping
def rename_original_key(key: str) -> str | None:
    """Our name of an original `EchoXForCausalLM` key; `None` for keys without a counterpart."""
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise OSError(f"No {what} at {path}.")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error


def text_config_from_original(original: dict) -> dict:
    """The LLM's `LlamaConfig` as a dict: the original config without its EchoX-only fields."""
    known = set(LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling", "torch_dtype"}
    fields = {key: value for key, value in original.items() if key not in ECHOX_ONLY_FIELDS}
    dropped = sorted(key for key in fields if key not in known)
    if dropped:
        logger.warning("Ignoring fields of the original config.json that are not LLM settings: %s", dropped)
    fields = {key: value for key, value in fields.items() if key in known}
    if "torch_dtype" in fields:
        fields.setdefault("dtype", fields.pop("torch_dtype"))
    for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if required not in fields:
            raise ValueError(f"The original config.json has no {required!r}; is it an EchoX (Llama) config?")
    return LlamaConfig(**fields).to_dict()


def echo_config_from_original(original: dict, text_config: dict, shapes: dict[str, tuple]) -> dict:
    """
    The echo decoder's transformer settings (the Llama fields of `EchoXEchoDecoderConfig`) as a dict: number of heads
    from the original `unit_model` preset, layers and widths from the checkpoint's tensor shapes, RoPE / norm /
    activation settings inherited from the LLM, 2048 positions.
    """
    unit_model = original.get("unit_model")
    if unit_model is None:
        preset = UNIT_MODEL_ABSENT
    else:
        preset = UNIT_MODEL_PRESETS.get(unit_model, UNIT_MODEL_DEFAULT)
    layers, hidden, heads, kv_heads, ffn = preset
    heads = heads or text_config["num_attention_heads"]

    layer_numbers = {int(m.group(1)) for key in shapes if (m := re.match(r"unit_translator\.model\.layers\.(\d+)\.", key))}
    try:
        shape_hidden = shapes["unit_translator.model.norm.weight"][0]
        q_rows = shapes["unit_translator.model.layers.0.self_attn.q_proj.weight"][0]
        k_rows = shapes["unit_translator.model.layers.0.self_attn.k_proj.weight"][0]
        shape_ffn = shapes["unit_translator.model.layers.0.mlp.gate_proj.weight"][0]
    except KeyError as error:
        raise ValueError(f"The original checkpoint has no echo decoder tensor {error}; was it saved with unit_output?") from None
    if q_rows % heads:
        raise ValueError(f"The echo decoder's q_proj has {q_rows} rows, not a multiple of its {heads} heads (unit_model={unit_model!r}).")
    head_dim = q_rows // heads
    found = (len(layer_numbers), shape_hidden, shape_ffn)
    expected = (layers, hidden or text_config["hidden_size"], ffn or text_config["intermediate_size"])
    if found != expected:
        logger.warning(
            "The echo decoder's tensors (layers, hidden, FFN = %s) differ from the unit_model=%r preset %s; using the tensors.",
            found,
            unit_model,
            expected,
        )
    return {
        "hidden_size": shape_hidden,
        "intermediate_size": shape_ffn,
        "num_hidden_layers": len(layer_numbers),
        "num_attention_heads": heads,
        "num_key_value_heads": k_rows // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": ECHO_MAX_POSITIONS,
        "vocab_size": 1,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "rms_norm_eps": text_config["rms_norm_eps"],
        "hidden_act": text_config["hidden_act"],
        "attention_bias": text_config.get("attention_bias", False),
        "mlp_bias": text_config.get("mlp_bias", False),
        "rope_parameters": dict(text_config["rope_parameters"]),
        "tie_word_embeddings": False,
    }


def unit_vocabulary_from_tokenizer(tokenizer, offset: int, unit_vocab_size: int) -> EchoXUnitVocabulary:
    """The unit-language pieces of the tokens `<|unit_PIECE|>` the original added at ids `offset …`."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(offset, min(offset + unit_vocab_size, len(tokenizer)))))
    pieces = []
    for token_id, token in enumerate(tokens, offset):
        match = UNIT_TOKEN.match(token or "")
        if match is None:
            raise ValueError(f"Tokenizer id {token_id} is {token!r}, not a unit-language token <|unit_...|>.")
        pieces.append(match.group(1))
    if len(pieces) != unit_vocab_size:
        raise ValueError(
            f"The original config has unit_vocab_size={unit_vocab_size} but the tokenizer holds {len(pieces)} unit "
            f"tokens after id {offset}."
        )
    return EchoXUnitVocabulary(pieces)


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as float16, bfloat16 or float32, got {dtype!r}.")
    return resolved


# ------------------------------------------------------------------------------------------------------- conversion
def convert_original(
    echox_dir: str,
    whisper_dir: str,
    out_dir: str,
    vocoder_checkpoint: str | None = None,
    vocoder_config: str | None = None,
    max_shard_size="5GB",
    dtype=None,
) -> str:
    """
    Convert a released EchoX directory (`config.json`, `model.safetensors.index.json` + shards, tokenizer files, and by
    default `g_00500000` + `vocoder_config.json`) and a Whisper directory (`config.json`, `preprocessor_config.json`,
    safetensors with `model.encoder.*` keys) into an [`EchoXForSpeechToSpeech`] checkpoint in `out_dir`.

    Args:
        vocoder_checkpoint / vocoder_config: the fairseq unit vocoder files (default: those in `echox_dir`).
        max_shard_size: largest output shard (`"5GB"`, `"500MB"`, bytes).
        dtype: cast floating tensors to this dtype (`None`: keep each tensor's stored dtype, fp16 as released).
    Returns:
        `out_dir`.
    """
    dtype = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    for source_dir in (echox_dir, whisper_dir):
        if os.path.realpath(out_dir) == os.path.realpath(source_dir):
            raise ValueError(f"The output directory must not be an input directory ({source_dir}).")
    vocoder_checkpoint = vocoder_checkpoint or os.path.join(echox_dir, VOCODER_CHECKPOINT)
    vocoder_config = vocoder_config or os.path.join(echox_dir, VOCODER_CONFIG)
    for path, what in ((vocoder_checkpoint, "vocoder checkpoint"), (vocoder_config, "vocoder config")):
        if not os.path.isfile(path):
            raise OSError(f"No {what} at {path}; pass --vocoder-checkpoint / --vocoder-config.")

    original = _read_json(os.path.join(echox_dir, "config.json"), "EchoX config.json")
    whisper_config = WhisperConfig.from_pretrained(whisper_dir)
    sources = open_checkpoint(echox_dir, "EchoX")
    whisper_sources = open_checkpoint(whisper_dir, "Whisper")
    shapes = {key: file.shape(key) for key, file in sources.items()}

    text_config = text_config_from_original(original)
    vocab_size = text_config["vocab_size"]
    embed_rows = shapes.get(LLM_EMBED, (None,))[0]
    if embed_rows != vocab_size:
        raise ValueError(
            f"The original config.json has vocab_size={vocab_size} but the LLM embedding {LLM_EMBED} has "
            f"{embed_rows} rows; the checkpoint and its config do not belong together."
        )
    if "unit_vocab_size" not in original:
        raise ValueError("The original config.json has no unit_vocab_size; it is not an EchoX speech-to-speech config.")
    unit_vocab_size = int(original["unit_vocab_size"])
    echo_config = echo_config_from_original(original, text_config, shapes)

    # tokenizer: <audio_patch>, the Llama-3 specials and the unit-language tokens
    # (the original config.json has a model_type transformers does not know; the LLM config stands in for it)
    tokenizer = AutoTokenizer.from_pretrained(echox_dir, config=LlamaConfig(**text_config))
    audio_token_id = _token_id(tokenizer, AUDIO_TOKEN)
    if audio_token_id is None:
        raise ValueError(f"The tokenizer in {echox_dir} has no {AUDIO_TOKEN} token; it is not the EchoX tokenizer.")
    if audio_token_id >= vocab_size:
        raise ValueError(f"{AUDIO_TOKEN} has id {audio_token_id}, outside the LLM vocabulary of {vocab_size} ids.")
    start_header, end_header = _token_id(tokenizer, START_HEADER_TOKEN), _token_id(tokenizer, END_HEADER_TOKEN)
    if start_header is None or end_header is None:
        raise ValueError(f"The tokenizer lacks the Llama-3 header tokens {START_HEADER_TOKEN} / {END_HEADER_TOKEN}.")
    eot = _token_id(tokenizer, EOT_TOKEN)
    eot = eot if eot is not None else tokenizer.eos_token_id
    if eot is None:
        raise ValueError(f"The tokenizer has neither {EOT_TOKEN} nor an eos token.")
    pad = tokenizer.pad_token_id
    if pad is None:
        logger.warning("The tokenizer has no pad token; using %s (id %d), as the released EchoX does.", EOT_TOKEN, eot)
        pad = eot
    unit_vocabulary = unit_vocabulary_from_tokenizer(tokenizer, vocab_size, unit_vocab_size)

    def piece(text):  # one template piece, tokenized on its own (BOS first), as the original builds its prompts
        return tokenizer(text).input_ids

    speaker_header = [start_header, *piece("speaker"), end_header, *piece("\n")]

    # vocoder
    vocoder = convert_fairseq_vocoder(vocoder_checkpoint, vocoder_config)
    num_units = vocoder.config.num_units
    unit_table = unit_vocabulary.to_unit_table(num_units)

    projector_in = shapes.get("model.mm_projector1.weight", (0, 0))[1]
    if projector_in % whisper_config.d_model:
        raise ValueError(
            f"mm_projector1 reads {projector_in} features, not a multiple of the Whisper width {whisper_config.d_model}: "
            "wrong Whisper directory?"
        )
    if PREFIX_QUIRK_ID >= vocab_size:
        raise ValueError(f"The LLM vocabulary ({vocab_size} ids) is too small for the released prefix id {PREFIX_QUIRK_ID}.")

    llm_dtype = text_config.get("dtype")
    config = EchoXConfig(
        audio_config=whisper_config.to_dict(),
        text_config=text_config,
        echo_config={
            **echo_config,
            "prefix_ids": speaker_header,
            "suffix_ids": [eot, *speaker_header],
            "prefix_quirk_id": PREFIX_QUIRK_ID,
            "unit_eos_token_id": eot,
        },
        vocoder_config=vocoder.config.to_dict(),
        audio_token_id=audio_token_id,
        adapter_frame_stack=projector_in // whisper_config.d_model,
        mask_eot_in_prompt=True,
        text_pad_token_id=pad,
        num_units=num_units,
        unit_vocab_size=unit_vocab_size,
        unit_token_offset=vocab_size,
        unit_max_piece_length=unit_table.shape[1],
    )
    config.dtype = str(dtype).removeprefix("torch.") if dtype is not None else llm_dtype
    config.architectures = [EchoXForSpeechToSpeech.__name__]

    # Our model on the meta device: the names and shapes every tensor must have.
    with torch.device("meta"):
        model = EchoXForSpeechToSpeech(config)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    tied_llm = bool(text_config.get("tie_word_embeddings"))

    items: dict[str, _Item] = {}

    def add(key, source, source_key):
        if key in items:
            raise ValueError(f"Two original tensors map to {key} ({items[key].source_key} and {source_key}).")
        out_dtype = source.dtype(source_key)
        if dtype is not None and out_dtype.is_floating_point:
            out_dtype = dtype
        items[key] = _Item(key, out_dtype, source.shape(source_key), source=source, source_key=source_key)

    unknown = []
    for key, source in sources.items():
        if key in (LM_HEAD, T2U_TEXT_TABLE) or IGNORED_KEY.search(key):
            continue
        ours = rename_original_key(key)
        if ours is None:
            unknown.append(key)
        else:
            add(ours, source, key)
    if unknown:
        raise ValueError(f"The original checkpoint has keys this converter does not know: {sorted(unknown)[:20]}")

    # The output table: `lm_head.weight` and the T2U text table are one tensor in training; any stored copy is used.
    copies = [key for key in (LM_HEAD, T2U_TEXT_TABLE) if key in sources]
    if tied_llm and LLM_EMBED in sources:
        copies.append(LLM_EMBED)
    if not copies:
        raise ValueError(f"The original checkpoint has neither {LM_HEAD} nor {T2U_TEXT_TABLE}.")
    for other in copies[1:]:
        if not _same_bytes(sources[copies[0]], copies[0], sources[other], other):
            raise ValueError(
                f"The original checkpoint stores {copies[0]} and {other} with different values; they are one tied "
                "table in EchoX, so this checkpoint cannot be converted faithfully."
            )
    if not tied_llm:
        add("language_model.lm_head.weight", sources[copies[0]], copies[0])
    elif copies[0] != LLM_EMBED:
        raise ValueError(
            f"tie_word_embeddings is true but the original checkpoint has {copies[0]} without {LLM_EMBED}; "
            "cannot place the tied table."
        )

    whisper_keys = 0
    for key, source in whisper_sources.items():
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                add("audio_tower." + key[len(prefix) :], source, key)
                whisper_keys += 1
                break
    if not whisper_keys:
        raise ValueError(f"No Whisper encoder weights (model.encoder.* keys) in {whisper_dir}.")

    in_memory = {f"vocoder.{key}": tensor for key, tensor in vocoder.state_dict().items()}
    in_memory["unit_table"] = unit_table
    for key, tensor in in_memory.items():
        out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        items[key] = _Item(key, out_dtype, tensor.shape, tensor=tensor)

    if tied_llm:
        expected.pop("language_model.lm_head.weight", None)
    missing = sorted(set(expected) - set(items))
    unexpected = sorted(set(items) - set(expected))
    mismatched = [f"{key}: {items[key].shape} vs {expected[key]}" for key in items if key in expected and items[key].shape != expected[key]]
    if missing or unexpected or mismatched:
        raise ValueError(
            "The original checkpoint does not fit the config built from it: "
            f"missing {missing[:20]}, unexpected {unexpected[:20]}, shape mismatches {mismatched[:20]}."
        )

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # shards of an earlier conversion, as save_pretrained removes them
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name):
            os.remove(os.path.join(out_dir, name))
    order = list(expected)  # our model's order: shards group the tensors of one sub-model
    write_sharded_safetensors([items[key] for key in order], out_dir, max_bytes)

    custom_object_save(model, out_dir, config=config)  # the model code, and `auto_map` in the config
    config.save_pretrained(out_dir)
    generation_config = EchoXGenerationConfig(
        do_sample=True,
        temperature=0.2,
        top_p=0.9,
        top_k=0,
        max_new_tokens=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eot,
        pad_token_id=pad,
        segment_boundary_token_id=piece(".")[-1],
    )
    EchoXGenerationConfig.from_generation_config(generation_config).save_pretrained(out_dir)  # other fields: defaults
    processor = EchoXProcessor(
        feature_extractor=WhisperFeatureExtractor.from_pretrained(whisper_dir),
        tokenizer=tokenizer,
        unit_vocabulary=unit_vocabulary,
        audio_token=AUDIO_TOKEN,
        prompt_format="llama3_pieces",
    )
    processor.save_pretrained(out_dir)
    return out_dir


__all__ = [
    "convert_original",
    "echo_config_from_original",
    "open_checkpoint",
    "parse_size",
    "rename_original_key",
    "text_config_from_original",
    "unit_vocabulary_from_tokenizer",
    "write_sharded_safetensors",
]
