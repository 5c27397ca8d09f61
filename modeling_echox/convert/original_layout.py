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

# Echo decoder ("T2U") size presets of the original, by `config.unit_model`: (layers, hidden, heads, kv heads, FFN);
# `None` = the LLM's value. Any other string gives the released "medium" decoder; no `unit_model` gives the last row.
UNIT_MODEL_PRESETS = {
    "large": (2, None, None, None, None),
    "small": (4, 512, 8, None, 2048),
    "tiny": (4, 512, 8, None, 2048),  # the name of "small" before the original renamed it
}
UNIT_MODEL_DEFAULT = (8, 768, 12, 12, 2048)
UNIT_MODEL_ABSENT = (6, 512, 8, None, 2048)


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


def token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id
