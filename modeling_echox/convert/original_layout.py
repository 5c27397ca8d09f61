"""
The released EchoX checkpoint's layout (EchoX-8B / EchoX-3B, `EchoXForCausalLM`): its special tokens, its key names
and how they map to ours ([`rename_original_key`]), and our configs read off its `config.json` and tensor shapes
([`text_config_from_original`], [`echo_config_from_original`], [`unit_vocabulary_from_tokenizer`]).
"""

import json
import logging
import os
import re

from transformers import LlamaConfig

from ..model.unit_vocabulary import EchoXUnitVocabulary

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

# Echo decoder ("T2U") size presets of the original's `T2ULlamaForCausalLM`, chosen by `config.unit_model`:
# (layers, hidden, heads, kv heads, head size, FFN); `None` = the LLM's value. A `unit_model` that is none of these names
# (the released "medium", or JSON null) gives UNIT_MODEL_OTHER; a config without the field gives UNIT_MODEL_ABSENT.
# "tiny" was the name of "small" before the original renamed it; the released code gives it UNIT_MODEL_OTHER.
UNIT_MODEL_PRESETS = {
    "large": (2, None, None, None, None, None),
    "small": (4, 512, 8, None, 64, 2048),
}
UNIT_MODEL_OTHER = (8, 768, 12, 12, 64, 2048)
UNIT_MODEL_ABSENT = (6, 512, 8, None, 64, 2048)
PRESET_HEAD_SIZE = 64  # the head size of every preset but "large" (which keeps the LLM's)
T2U_LAYER = re.compile(r"unit_translator\.model\.layers\.(\d+)\.")


def rename_original_key(key: str) -> str | None:
    """Our name of an original `EchoXForCausalLM` key; `None` for keys without a counterpart."""
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def read_json(path: str, what: str) -> dict:
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


def _preset_shape(preset: tuple, text_config: dict) -> tuple[int, ...]:
    """A preset as `(layers, hidden, heads, kv heads, head size, FFN)`, the LLM's values filled in."""
    llm = (
        None,
        text_config["hidden_size"],
        text_config["num_attention_heads"],
        text_config["num_key_value_heads"],
        text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"],
        text_config["intermediate_size"],
    )
    return tuple(llm[i] if value is None else value for i, value in enumerate(preset))


def _describe(layers, hidden, q_rows, k_rows, ffn) -> str:
    return f"{layers} layers of width {hidden} (q_proj {q_rows} rows, k_proj {k_rows} rows, FFN {ffn})"


def _echo_tensor_shapes(shapes: dict[str, tuple]) -> tuple[int, int, int, int, int]:
    """`(layers, hidden, q rows, k rows, FFN)` of the original echo decoder's tensors."""
    layer_numbers = sorted({int(m.group(1)) for key in shapes if (m := T2U_LAYER.match(key))})
    if layer_numbers != list(range(len(layer_numbers))):
        raise ValueError(f"The original echo decoder's layers are numbered {layer_numbers}, not 0 … n-1.")
    names = {
        "hidden": "unit_translator.model.norm.weight",
        "q": "unit_translator.model.layers.0.self_attn.q_proj.weight",
        "k": "unit_translator.model.layers.0.self_attn.k_proj.weight",
        "ffn": "unit_translator.model.layers.0.mlp.gate_proj.weight",
    }
    missing = [key for key in names.values() if key not in shapes]
    if missing:
        raise ValueError(f"The original checkpoint has no echo decoder tensor {missing[0]}; was it saved with unit_output?")
    return (len(layer_numbers), *(shapes[key][0] for key in names.values()))


def _head_split_from_shapes(found: tuple[int, ...], text_config: dict) -> tuple[int, int, int]:
    """
    `(heads, kv heads, head size)` of an echo decoder whose config has no `unit_model`, read off its q/k rows. The
    original's presets split heads in two ways: a head size of 64 (every preset but "large"), or the LLM's own split
    ("large"). The split is taken when exactly one of them fits the rows (or both fit and agree); otherwise the rows
    do not tell the number of heads, and the conversion is refused.
    """
    layers, hidden, q_rows, k_rows, ffn = found
    readings = {}
    if q_rows % PRESET_HEAD_SIZE == 0 and k_rows % PRESET_HEAD_SIZE == 0:
        heads, kv_heads = q_rows // PRESET_HEAD_SIZE, k_rows // PRESET_HEAD_SIZE
        if kv_heads and heads % kv_heads == 0:
            readings[f"a head size of {PRESET_HEAD_SIZE} (the small, medium and default presets)"] = (heads, kv_heads, PRESET_HEAD_SIZE)
    _, _, heads, kv_heads, head_dim, _ = _preset_shape(UNIT_MODEL_PRESETS["large"], text_config)
    if (q_rows, k_rows) == (heads * head_dim, kv_heads * head_dim):
        readings["the LLM's split (the large preset)"] = (heads, kv_heads, head_dim)
    splits = set(readings.values())
    if len(splits) == 1:
        return splits.pop()
    what = _describe(*found)
    if not splits:
        raise ValueError(
            f"The original config.json has no unit_model and the echo decoder's tensors ({what}) fit none of the "
            f"original's head splits (a head size of {PRESET_HEAD_SIZE}, or the LLM's {heads} heads / {kv_heads} kv heads "
            f"of size {head_dim}), so its number of attention heads is unknown; add the right unit_model to config.json."
        )
    options = "; ".join(f"{heads} heads / {kv} kv heads of size {size} ({name})" for name, (heads, kv, size) in readings.items())
    raise ValueError(
        f"The original config.json has no unit_model and the echo decoder's tensors ({what}) are ambiguous: its "
        f"attention could be {options}. Add the right unit_model to config.json (\"large\" for the LLM's split)."
    )


def echo_config_from_original(original: dict, text_config: dict, shapes: dict[str, tuple]) -> dict:
    """
    The echo decoder's transformer settings (the Llama fields of `EchoXEchoDecoderConfig`) as a dict, with RoPE / norm
    / activation settings inherited from the LLM and 2048 positions, as the original builds it.

    With `unit_model` in `config.json` its preset (see `UNIT_MODEL_PRESETS`) gives every size, and the checkpoint's
    tensors must have exactly those sizes (the original would not load them otherwise): a disagreement is refused,
    naming both. Without `unit_model` the layers, width and FFN size are read off the tensors and the head split from
    the q/k rows where that is unambiguous (see `_head_split_from_shapes`); an ambiguous split is refused.
    """
    found = _echo_tensor_shapes(shapes)
    if "unit_model" in original:
        unit_model = original["unit_model"]
        presets = [UNIT_MODEL_PRESETS.get(unit_model, UNIT_MODEL_OTHER)]
        if unit_model == "tiny":  # the released code's meaning, then the one the name had before the rename
            presets.append(UNIT_MODEL_PRESETS["small"])
        expected = []
        for preset in presets:
            layers, hidden, heads, kv_heads, head_dim, ffn = _preset_shape(preset, text_config)
            expected.append((layers, hidden, heads * head_dim, kv_heads * head_dim, ffn))
            if found == expected[-1]:
                break
        else:
            raise ValueError(
                f"The original config.json has unit_model={unit_model!r}, for which the original builds an echo decoder "
                f"of {' or '.join(_describe(*shape) for shape in expected)}, but the checkpoint's echo decoder tensors "
                f"are {_describe(*found)}; the config and the checkpoint do not belong together."
            )
    else:
        heads, kv_heads, head_dim = _head_split_from_shapes(found, text_config)
    layers, hidden, _, _, ffn = found
    return {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
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


def token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id
