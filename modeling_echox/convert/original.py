"""Converts a released EchoX checkpoint (EchoX-8B / EchoX-3B: sharded safetensors of `EchoXForCausalLM`, its tokenizer
and the fairseq unit vocoder), together with the separate Whisper-large-v3 directory, to an [`EchoXForSpeechToSpeech`]
checkpoint directory (sharded safetensors, config, generation config, processor files and the model code).

    echox convert-original --echox EchoX-8B --whisper whisper-large-v3 --out echox-8b-hf

Tensors are streamed: each one is copied byte for byte (or cast, with `dtype`) in chunks of 64 MiB from its input
file into the output shard being written, so the conversion holds a few chunks in memory, not a shard, and maps no
input file. Every original tensor lands unchanged in exactly one tensor of ours.

The output table. Three original names may hold one table: `model.embed_tokens.weight` (E, the LLM's input embedding,
always stored), `lm_head.weight` (L, the LLM's output head) and `unit_translator.model.embed_tokens.weight` (T, the echo
decoder's frozen text table). The original's training script makes T the very tensor L
(`unit_translator.model.embed_tokens.weight = lm_head.weight`), and with `tie_word_embeddings` true in `config.json` its
loading makes L the tensor E; `save_pretrained` keeps one or more names of a shared tensor, depending on how it was
saved. Ours holds the table once: as `language_model.lm_head.weight` (E apart), or, with `tie_word_embeddings` true, as
the LLM's embedding (our LLM keeps the tie). Accepted layouts:

- untied (`tie_word_embeddings` false, as EchoX-8B): L and / or T stored; when both are, they must be equal.
- tied (`tie_word_embeddings` true, as a Llama-3.2-3B base has it):
  (a) neither L nor T stored: the LLM's head is its embedding, and so is the echo decoder's text table;
  (b) L stored and equal to E (tied, both copies saved);
  (c) T stored and equal to the LLM's head, i.e. to E, with or without L (then also equal to E).

Refused, naming the tensors: an untied checkpoint with neither L nor T (the original would start its head at random);
any stored copy that differs from the tensor it is tied to. The original would use such copies apart (L for the LLM, T
for the echo decoder; tied, it keeps whichever of L and E it reads last); a checkpoint trained by EchoX never has them
differ, and ours holds a single table, so such a checkpoint is not converted.

The echo decoder's size comes from `unit_model` in `config.json` (the original's presets; the tensors must agree) or,
without it, from the tensor shapes where they are unambiguous: see `original_layout.echo_config_from_original`.
"""

import logging
import os
import re

import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.dynamic_module_utils import custom_object_save

from ..model.configuration_echox import EchoXConfig
from ..model.generation_configuration_echox import EchoXGenerationConfig
from ..model.modeling_echox import EchoXForSpeechToSpeech
from ..model.processing_echox import EchoXProcessor
from .fairseq_vocoder import convert_fairseq_vocoder
from .original_layout import (
    AUDIO_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    IGNORED_KEY,
    LLM_EMBED,
    LM_HEAD,
    PREFIX_QUIRK_ID,
    START_HEADER_TOKEN,
    T2U_TEXT_TABLE,
    VOCODER_CHECKPOINT,
    VOCODER_CONFIG,
    echo_config_from_original,
    read_json,
    rename_original_key,
    text_config_from_original,
    token_id,
    unit_vocabulary_from_tokenizer,
)
from .safetensors_streaming import (
    ShardItem,
    open_checkpoint,
    parse_size,
    resolve_dtype,
    same_bytes,
    write_sharded_safetensors,
)

logger = logging.getLogger(__name__)


def output_table_source(sources: dict, tie_word_embeddings: bool) -> str | None:
    """
    The original key whose tensor becomes our `language_model.lm_head.weight`, or `None` when the LLM keeps
    `tie_word_embeddings` (its embedding is then the table). See the module docstring for the layouts; every stored
    copy of the table must equal the tensor it is tied to, else `ValueError` names both.
    """
    if LLM_EMBED not in sources:
        raise ValueError(f"The original checkpoint has no LLM embedding {LLM_EMBED}.")
    stored = [key for key in (LM_HEAD, T2U_TEXT_TABLE) if key in sources]
    if tie_word_embeddings:
        table = LLM_EMBED
    elif stored:
        table = stored[0]
    else:
        raise ValueError(
            f"The original checkpoint has neither {LM_HEAD} nor {T2U_TEXT_TABLE} and its config.json has "
            f"tie_word_embeddings false: the LLM's output head is missing (the original would start it at random)."
        )
    for key in stored:
        if key != table and not same_bytes(sources[table], table, sources[key], key):
            if tie_word_embeddings and key == LM_HEAD:
                why = (
                    "config.json has tie_word_embeddings true, so the original loads both into one tensor and keeps "
                    "whichever it reads last; set tie_word_embeddings to false if the head is meant to be separate"
                )
            else:
                why = (
                    "EchoX's training ties the echo decoder's text table to the LLM's output head, and this model holds "
                    "one table for both (the original would use the two copies apart)"
                )
            raise ValueError(
                f"The original checkpoint stores {table} and {key} with different values, but they are one tied table: "
                f"{why}. This checkpoint cannot be converted faithfully."
            )
    return None if tie_word_embeddings else table


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
    dtype = resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    for source_dir in (echox_dir, whisper_dir):
        if os.path.realpath(out_dir) == os.path.realpath(source_dir):
            raise ValueError(f"The output directory must not be an input directory ({source_dir}).")
    vocoder_checkpoint = vocoder_checkpoint or os.path.join(echox_dir, VOCODER_CHECKPOINT)
    vocoder_config = vocoder_config or os.path.join(echox_dir, VOCODER_CONFIG)
    for path, what in ((vocoder_checkpoint, "vocoder checkpoint"), (vocoder_config, "vocoder config")):
        if not os.path.isfile(path):
            raise OSError(f"No {what} at {path}; pass --vocoder-checkpoint / --vocoder-config.")

    original = read_json(os.path.join(echox_dir, "config.json"), "EchoX config.json")
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
    audio_token_id = token_id(tokenizer, AUDIO_TOKEN)
    if audio_token_id is None:
        raise ValueError(f"The tokenizer in {echox_dir} has no {AUDIO_TOKEN} token; it is not the EchoX tokenizer.")
    if audio_token_id >= vocab_size:
        raise ValueError(f"{AUDIO_TOKEN} has id {audio_token_id}, outside the LLM vocabulary of {vocab_size} ids.")
    start_header, end_header = token_id(tokenizer, START_HEADER_TOKEN), token_id(tokenizer, END_HEADER_TOKEN)
    if start_header is None or end_header is None:
        raise ValueError(f"The tokenizer lacks the Llama-3 header tokens {START_HEADER_TOKEN} / {END_HEADER_TOKEN}.")
    eot = token_id(tokenizer, EOT_TOKEN)
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
        unit_pieces_split_units=unit_vocabulary.splits_units,
    )
    config.dtype = str(dtype).removeprefix("torch.") if dtype is not None else llm_dtype
    config.architectures = [EchoXForSpeechToSpeech.__name__]

    # Our model on the meta device: the names and shapes every tensor must have.
    with torch.device("meta"):
        model = EchoXForSpeechToSpeech(config)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    tied_llm = bool(text_config.get("tie_word_embeddings"))

    items: dict[str, ShardItem] = {}

    def add(key, source, source_key):
        if key in items:
            raise ValueError(f"Two original tensors map to {key} ({items[key].source_key} and {source_key}).")
        out_dtype = source.dtype(source_key)
        if dtype is not None and out_dtype.is_floating_point:
            out_dtype = dtype
        items[key] = ShardItem(key, out_dtype, source.shape(source_key), source=source, source_key=source_key)

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

    table = output_table_source(sources, tied_llm)
    if table is not None:
        add("language_model.lm_head.weight", sources[table], table)

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
        # the vocoder stays float32 (the model keeps it so when loading in half precision); the rest takes `dtype`
        cast = dtype is not None and tensor.is_floating_point() and not key.startswith("vocoder.")
        out_dtype = dtype if cast else tensor.dtype
        items[key] = ShardItem(key, out_dtype, tensor.shape, tensor=tensor)

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
        unit_token_offset=config.unit_token_offset,
        num_units=config.num_units,
    )
    processor.save_pretrained(out_dir)
    return out_dir


__all__ = ["convert_original"]
