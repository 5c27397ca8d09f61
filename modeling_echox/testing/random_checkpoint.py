"""Randomly initialised EchoX checkpoints of a few sizes, complete with processor files, for tests and smoke runs."""

import torch
from transformers import WhisperFeatureExtractor

from ..model.configuration_echox import EchoXConfig
from ..model.generation_configuration_echox import EchoXGenerationConfig
from ..model.modeling_echox import EchoXForSpeechToSpeech
from ..model.processing_echox import EchoXProcessor
from ..model.unit_vocabulary import EchoXUnitVocabulary
from .tiny_tokenizer import (
    AUDIO_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    START_HEADER_TOKEN,
    build_tiny_tokenizer,
)

# Sub-model sizes. "tiny" loads and generates in well under a second on a laptop CPU.
SIZES = {
    "tiny": {
        "audio": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        "echo": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16},
        "vocoder": {"unit_embed_dim": 16, "upsample_initial_channel": 32},
        "num_units": 64,
        "max_new_tokens": 24,
        "echo_max_new_tokens": 48,
    },
    "small": {
        "audio": {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536},
        "text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
        "echo": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64},
        "vocoder": {"unit_embed_dim": 128, "upsample_initial_channel": 128},
        "num_units": 500,
        "max_new_tokens": 64,
        "echo_max_new_tokens": 256,
    },
}


def build_random_echox(
    size: str = "tiny",
    seed: int = 0,
    unit_vocabulary: EchoXUnitVocabulary | None = None,
    num_units: int | None = None,
    echo_spelling_length: int = 0,
    echo_decoder_type: str = "autoregressive",
) -> tuple[EchoXForSpeechToSpeech, EchoXProcessor]:
    """
    A randomly initialised EchoX and its processor (tiny Llama-3-style tokenizer).

    Without `unit_vocabulary` the unit vocabulary is one token per unit (`EchoXUnitVocabulary.from_num_units` of the
    size's `num_units`). With one (e.g. `EchoXUnitLanguage.to_vocabulary()` of a stage-0 run), the echo decoder's unit
    tokens, the model's `unit_table`, the vocoder and the processor all follow it: `unit_vocab_size = len(vocabulary)`,
    `num_units` = the given `num_units` or 1 + the largest unit id the vocabulary spells, `unit_max_piece_length` =
    the width of its unit table. `echo_spelling_length` > 0 gives a spelling echo decoder (its table filled from the
    tokenizer); `echo_decoder_type="ctc"` a CTC echo decoder (with the units-only head it needs).
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    spec = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab()

    def piece(text):  # ids of one template piece, BOS included, as the released prompt builder does
        return tokenizer(text).input_ids

    speaker_header = [vocab[START_HEADER_TOKEN], *piece("speaker"), vocab[END_HEADER_TOKEN], *piece("\n")]
    if unit_vocabulary is None:
        num_units = spec["num_units"] if num_units is None else num_units
        unit_vocabulary = EchoXUnitVocabulary.from_num_units(num_units)
    elif num_units is None:
        spelled = [u for i in range(len(unit_vocabulary)) for u in unit_vocabulary.units_of(i)]
        if not spelled:
            raise ValueError("build_random_echox: the unit vocabulary spells no unit ids; pass num_units.")
        num_units = max(spelled) + 1
    unit_table = unit_vocabulary.to_unit_table(num_units)
    text_vocab_size = len(tokenizer)
    config = EchoXConfig(
        audio_config={"model_type": "whisper", "num_mel_bins": 80, "max_source_positions": 1500, **spec["audio"]},
        text_config={
            "model_type": "llama",
            "vocab_size": text_vocab_size,
            "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": vocab[EOT_TOKEN],
            "pad_token_id": vocab[EOT_TOKEN],
            "tie_word_embeddings": False,
            **spec["text"],
        },
        echo_config={
            "max_position_embeddings": 2048,
            **spec["echo"],
            "prefix_ids": speaker_header,
            "suffix_ids": [vocab[EOT_TOKEN], *speaker_header],
            "prefix_quirk_id": None,
            "unit_eos_token_id": vocab[EOT_TOKEN],
            "spelling_length": echo_spelling_length,
            "decoder_type": echo_decoder_type,
            "units_only_head": echo_decoder_type == "ctc",
        },
        vocoder_config={"num_units": num_units, **spec["vocoder"]},
        audio_token_id=vocab[AUDIO_TOKEN],
        text_pad_token_id=vocab[EOT_TOKEN],
        num_units=num_units,
        unit_vocab_size=len(unit_vocabulary),
        unit_token_offset=text_vocab_size,
        unit_max_piece_length=unit_table.shape[1],
    )
    torch.manual_seed(seed)
    model = EchoXForSpeechToSpeech(config).eval()
    model.unit_table.copy_(unit_table)
    if echo_spelling_length:
        model.echo_decoder.set_token_spelling(tokenizer)
    generation_config = EchoXGenerationConfig(
        do_sample=False,
        max_new_tokens=spec["max_new_tokens"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=vocab[EOT_TOKEN],
        pad_token_id=vocab[EOT_TOKEN],
        segment_boundary_token_id=piece(".")[-1],
        echo_max_new_tokens=spec["echo_max_new_tokens"],
    )
    model.generation_config = EchoXGenerationConfig.from_generation_config(generation_config)  # other fields: defaults
    processor = EchoXProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        tokenizer=tokenizer,
        unit_vocabulary=unit_vocabulary,
        prompt_format="llama3_pieces",
        unit_token_offset=config.unit_token_offset,
        num_units=config.num_units,
    )
    return model, processor


def write_random_checkpoint(out_dir: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a complete random checkpoint (config, safetensors, generation config, processor files) to `out_dir`."""
    model, processor = build_random_echox(size, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
