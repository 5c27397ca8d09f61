"""EchoXConfig (architecture, the echo-decoder sub-config) and EchoXGenerationConfig (segmentation, echo decoding)."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
from transformers import GenerationConfig, LlamaConfig

from modeling_echox import (
    EchoXConfig,
    EchoXEchoDecoderConfig,
    EchoXForSpeechToSpeech,
    EchoXGenerationConfig,
)
from modeling_echox.model.generation_configuration_echox import ECHOX_GENERATION_FIELDS
from modeling_echox.model.loading import load_echox
from modeling_echox.testing.random_checkpoint import build_random_echox

SR = 16000
# config.json and generation_config.json of `build_random_echox("tiny", seed=1)` as the first layout wrote them: the echo
# decoder's fields (`echo_*`) and the segmentation fields at the top level of config.json, a plain LlamaConfig as
# echo_config, `sampling_rate` and `max_audio_seconds`, and no EchoX field in generation_config.json.
FIRST_LAYOUT = os.path.join(os.path.dirname(__file__), "fixtures", "first_layout_tiny")
# Policy fields of the first layout's config.json set away from their defaults for the test.
FIRST_LAYOUT_POLICY = {"segmentation_mode": "fast", "fast_first_segment_tokens": 2,
                       "fast_first_segment_whole_words": False, "echo_max_new_tokens": 6}


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_random_echox("tiny", seed=1)
    clip = (0.05 * np.random.default_rng(0).standard_normal(SR * 2)).astype(np.float32)
    return model, processor, processor(audio=clip, sampling_rate=SR)


def _first_layout_config() -> dict:
    with open(os.path.join(FIRST_LAYOUT, "config.json"), encoding="utf-8") as handle:
        return {**json.load(handle), **FIRST_LAYOUT_POLICY}


def _same_answer(first, second):
    assert first.text == second.text and first.segments == second.segments
    assert first.segment_unit_ids == second.segment_unit_ids
    np.testing.assert_array_equal(first.sequences.numpy(), second.sequences.numpy())
    np.testing.assert_array_equal(first.waveforms[0].numpy(), second.waveforms[0].numpy())


def test_first_layout_checkpoint_loads_as_the_same_model(tiny, tmp_path):
    model, processor, inputs = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w", encoding="utf-8") as handle:
        json.dump(_first_layout_config(), handle)
    shutil.copy(os.path.join(FIRST_LAYOUT, "generation_config.json"), tmp_path)

    loaded, _ = load_echox(str(tmp_path))
    assert {**loaded.config.echo_config.to_dict(), "dtype": None} == {**model.config.echo_config.to_dict(), "dtype": None}
    generation = loaded.generation_config
    assert isinstance(generation, EchoXGenerationConfig)
    assert {name: getattr(generation, name) for name in FIRST_LAYOUT_POLICY} == FIRST_LAYOUT_POLICY
    assert generation.segment_boundary_token_id == model.generation_config.segment_boundary_token_id
    assert generation.max_new_tokens == 24  # transformers' fields still come from generation_config.json
    expected = model.generate(**inputs, tokenizer=processor.tokenizer, **FIRST_LAYOUT_POLICY)
    _same_answer(loaded.generate(**inputs, tokenizer=processor.tokenizer), expected)

    # Saved again, it is in the current layout, and still the same model.
    loaded.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    with open(tmp_path / "again" / "config.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["echo_config"]["model_type"] == "echox_echo_decoder"
    moved = [key for key in saved if key.startswith(("echo_", "segment", "fast_")) and key != "echo_config"]
    assert moved == [] and "sampling_rate" not in saved and "max_audio_seconds" not in saved
    with open(tmp_path / "again" / "generation_config.json", encoding="utf-8") as handle:
        assert json.load(handle)["fast_first_segment_tokens"] == 2
    reloaded = EchoXForSpeechToSpeech.from_pretrained(tmp_path / "again").eval()
    _same_answer(reloaded.generate(**inputs, tokenizer=processor.tokenizer), expected)


def test_first_layout_echo_fields_move_into_the_echo_config():
    old = _first_layout_config()
    config = EchoXConfig(**old)
    echo = config.echo_config
    assert type(echo) is EchoXEchoDecoderConfig
    assert (echo.unit_eos_token_id, echo.prefix_ids, echo.suffix_ids, echo.prefix_quirk_id) == (
        old["echo_eos_token_id"], old["echo_prefix_ids"], old["echo_suffix_ids"], old["echo_prefix_quirk_id"])
    assert (echo.hidden_size, echo.num_hidden_layers, echo.eos_token_id) == (32, 2, None)
    assert EchoXGenerationConfig.from_model_config(config).fast_first_segment_tokens == 2
    # an echo_config given as a LlamaConfig object, with the echo fields beside it, as the first layout's code made it
    llama = LlamaConfig(**{k: v for k, v in old["echo_config"].items() if k != "model_type"})
    ctc = {**old, "echo_config": llama, "echo_decoder_type": "ctc", "echo_units_only_head": True, "echo_ctc_upsample": 2}
    echo = EchoXConfig(**ctc).echo_config
    assert (echo.decoder_type, echo.units_only_head, echo.ctc_upsample, echo.hidden_size) == ("ctc", True, 2, 32)
    # fields a first-layout config.json does not hold take the defaults they had then
    defaulted = ("echo_prefix_quirk_id", "echo_decoder_type", "echo_spelling_length", "echo_ctc_upsample")
    config = EchoXConfig(**{k: v for k, v in old.items() if k not in defaulted and not k.startswith(("segment", "fast_"))})
    echo = config.echo_config
    assert (echo.prefix_quirk_id, echo.decoder_type, echo.spelling_length, echo.ctc_upsample) == (12800, "autoregressive", 0, 3)
    assert EchoXGenerationConfig.from_model_config(config).segment_min_tokens == 20


def test_num_units_must_match_the_vocoder(tiny):
    config = tiny[0].config.to_dict()
    with pytest.raises(ValueError, match=r"num_units \(65\) must equal the vocoder's"):
        EchoXConfig(**{**config, "num_units": 65})


def test_echo_ids_must_lie_in_the_echo_vocabulary(tiny):
    config = copy.deepcopy(tiny[0].config.to_dict())
    config["echo_config"]["unit_eos_token_id"] = config["unit_token_offset"] + config["unit_vocab_size"]
    with pytest.raises(ValueError, match="unit_eos_token_id"):
        EchoXConfig(**config)
    with pytest.raises(ValueError, match="spelling_length"):
        EchoXEchoDecoderConfig(spelling_length=-1)


def test_generation_config_refuses_bad_values(tiny):
    model, processor, inputs = tiny
    with pytest.raises(ValueError, match="Unknown segmentation mode 'slow'"):
        EchoXGenerationConfig(segmentation_mode="slow")
    with pytest.raises(ValueError, match="fast_min_segment_tokens"):
        EchoXGenerationConfig(fast_min_segment_tokens=0)
    with pytest.raises(ValueError, match="fast_first_segment_whole_words"):
        EchoXGenerationConfig(fast_first_segment_whole_words="no")
    before = model.generation_config.to_dict()
    with pytest.raises(ValueError, match="segment_max_tokens"):
        model.generate(**inputs, tokenizer=processor.tokenizer, segment_max_tokens=0)
    assert model.generation_config.to_dict() == before


def test_a_given_generation_config_keeps_the_models_echox_fields(tiny):
    model, processor, inputs = tiny
    fast = model.generate(**inputs, tokenizer=processor.tokenizer, segmentation_mode="fast", max_new_tokens=12,
                          min_new_tokens=12)
    assert len(fast.segments[0]) > 1  # faithful would keep these 12 tokens in one segment
    model.generation_config.segmentation_mode = "fast"
    try:
        for given in (GenerationConfig(max_new_tokens=12, min_new_tokens=12),
                      EchoXGenerationConfig(max_new_tokens=12, min_new_tokens=12)):
            _same_answer(model.generate(**inputs, tokenizer=processor.tokenizer, generation_config=given), fast)
    finally:
        model.generation_config.segmentation_mode = "faithful"


def test_generation_fields_have_the_released_defaults():
    config = EchoXGenerationConfig.from_generation_config(GenerationConfig())
    assert {name: getattr(config, name) for name in ECHOX_GENERATION_FIELDS} == ECHOX_GENERATION_FIELDS
    assert ECHOX_GENERATION_FIELDS["segmentation_mode"] == "faithful" and ECHOX_GENERATION_FIELDS["segment_min_tokens"] == 20
    assert EchoXGenerationConfig().segmentation_mode is None  # unset: the model's value applies in generate
