"""The dictation found by CTC prefix beam search with the LLM as language model (`adapter_output="dictation"`)."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_echox.model.dictation_search import (
    LanguageModelPrefixScorer,
    ctc_prefix_beam_search,
)
from modeling_echox.model.generation_configuration_echox import EchoXGenerationConfig
from modeling_echox.model.speech_adapter import EchoXSpeechAdapter
from modeling_echox.testing.random_checkpoint import build_random_echox

BLANK = 0


def frames(*rows):
    """Log-probabilities `[frames, V]` from rows of probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log()


def greedy(log_probs, blank=BLANK):
    ids = log_probs.argmax(-1)
    return [int(i) for i in torch.unique_consecutive(ids) if int(i) != blank]


def test_the_search_sums_every_alignment_of_a_prefix():
    # Blank wins each frame, so the greedy dictation is empty (P = 0.16); but "a" has three alignments (a a, a -, - a)
    # with P = 0.4025 in all, more than any other prefix.
    log_probs = frames([0.4, 0.35, 0.25], [0.4, 0.35, 0.25])
    assert greedy(log_probs) == []
    assert ctc_prefix_beam_search(log_probs, BLANK, beam_size=4) == [1]


def test_a_repeated_token_needs_a_blank_between_its_two_copies():
    confident = frames([0.01, 0.98, 0.01], [0.01, 0.98, 0.01], [0.98, 0.01, 0.01], [0.01, 0.98, 0.01])
    assert ctc_prefix_beam_search(confident, BLANK, beam_size=3) == [1, 1] == greedy(confident)


def test_without_a_language_model_a_confident_dictation_is_the_greedy_one():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 12, generator=generator) * 6
    log_probs = torch.log_softmax(logits, -1)
    assert ctc_prefix_beam_search(log_probs, BLANK, beam_size=8) == greedy(log_probs)


def test_the_language_model_weight_picks_the_words_it_expects():
    # The sound slightly favours token 2; the language model strongly expects token 1 after the empty prefix.
    log_probs = frames([0.1, 0.4, 0.5], [0.9, 0.05, 0.05])
    expects_one = torch.log(torch.tensor([0.05, 0.9, 0.05]))

    def scorer(prefixes):
        return expects_one.expand(len(prefixes), -1)

    assert ctc_prefix_beam_search(log_probs, BLANK, beam_size=4) == [2]
    assert ctc_prefix_beam_search(log_probs, BLANK, beam_size=4, lm_weight=1.0, next_token_log_probs=scorer) == [1]


def test_the_end_of_the_utterance_is_scored_too():
    # Acoustically "1" and "1 2" are alike; the language model says the utterance ends after "1 2" only.
    log_probs = frames([0.05, 0.9, 0.05], [0.5, 0.05, 0.45])
    end = 3

    def scorer(prefixes):
        rows = torch.full((len(prefixes), 4), math.log(0.25))
        for row, prefix in enumerate(prefixes):
            if prefix == (1,):
                rows[row] = torch.log(torch.tensor([0.01, 0.01, 0.97, 0.01]))
            if prefix == (1, 2):
                rows[row] = torch.log(torch.tensor([0.01, 0.01, 0.01, 0.97]))
        return rows

    padded = torch.cat([log_probs, torch.full((2, 1), -1e9, dtype=log_probs.dtype)], dim=1)
    assert ctc_prefix_beam_search(padded, BLANK, 4, lm_weight=1.0, next_token_log_probs=scorer, end_token_id=end) == [1, 2]


def test_a_length_bonus_keeps_a_word_the_language_model_finds_unlikely():
    log_probs = frames([0.5, 0.5, 0.0], [0.98, 0.01, 0.01])
    unlikely = torch.log(torch.tensor([0.85, 0.05, 0.1]))

    def scorer(prefixes):
        return unlikely.expand(len(prefixes), -1)

    search = dict(beam_size=4, lm_weight=1.0, next_token_log_probs=scorer)
    assert ctc_prefix_beam_search(log_probs, BLANK, **search) == []
    assert ctc_prefix_beam_search(log_probs, BLANK, **search, length_bonus=3.0) == [1]


def test_bad_search_settings_are_refused():
    log_probs = frames([0.5, 0.5])
    with pytest.raises(ValueError, match="beam_size"):
        ctc_prefix_beam_search(log_probs, BLANK, beam_size=0)
    with pytest.raises(ValueError, match="next_token_log_probs"):
        ctc_prefix_beam_search(log_probs, BLANK, beam_size=2, lm_weight=0.5)
    with pytest.raises(ValueError, match="frames, vocabulary"):
        ctc_prefix_beam_search(log_probs[0], BLANK, beam_size=2)


@pytest.fixture(scope="module")
def tiny_llm():
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("masked", [(), (6,)])
def test_the_prefix_scorer_is_the_language_model_on_the_whole_text(tiny_llm, masked):
    context = [5, 6, 7]
    scorer = LanguageModelPrefixScorer(tiny_llm, context, pad_token_id=0, masked_ids=masked)
    prefixes = [(8,), (), (8, 9, 10), (11, 12)]
    scores = scorer(prefixes)
    for prefix, row in zip(prefixes, scores):
        ids = torch.tensor([context + list(prefix)])
        mask = torch.ones_like(ids)
        mask[0, 1] = 0 if masked else 1
        with torch.no_grad():
            logits = tiny_llm(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]).logits
        torch.testing.assert_close(row, torch.log_softmax(logits[0, -1].float(), -1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scorer([(8, 9, 10)]), scores[2:3])  # kept, not scored again


# ----------------------------------------------------------------------------------------------- in the EchoX model
def noise(seconds, seed):
    return (0.05 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


@pytest.fixture(scope="module")
def dictating():
    model, processor = build_random_echox("tiny", seed=0)
    model.config.adapter_output = "dictation"
    return model.eval(), processor


def _clip_log_probs(model, features):
    with torch.no_grad():
        speech = model.get_speech_embeddings(features, return_ctc_logits=True)
    logits = speech.ctc_logits[0]
    if speech.ctc_lengths is not None:
        logits = logits[: int(speech.ctc_lengths[0])]
    return torch.log_softmax(logits.float(), -1)


def test_generate_reads_the_dictation_the_search_finds(dictating):
    model, processor = dictating
    inputs = processor(audio=[noise(1.5, 3)], sampling_rate=16000)
    config = model.config
    prompt = inputs["input_ids"][0]
    context = prompt[: int(torch.nonzero(prompt == config.audio_token_id)[0, 0])].tolist()
    masked = [config.text_pad_token_id] if config.mask_eot_in_prompt else []
    scorer = LanguageModelPrefixScorer(model.language_model, context, config.text_pad_token_id, masked)
    expected = ctc_prefix_beam_search(_clip_log_probs(model, inputs["input_features"]), config.audio_token_id, 4, 0.5,
                                      scorer, config.text_pad_token_id, length_bonus=1.0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, return_audio=False, dictation_beam_size=4,
                             dictation_lm_weight=0.5, dictation_length_bonus=1.0)
    assert out.dictation[0].tolist() == expected
    assert len(expected) > 0 and expected != greedy(_clip_log_probs(model, inputs["input_features"]), config.audio_token_id)
    # and the LLM answers the searched ids as it answers them given as text
    at = len(context)
    as_text = torch.cat([prompt[:at], torch.tensor(expected, dtype=torch.long), prompt[at + 1 :]])[None]
    with torch.no_grad():
        from_text = model.generate(input_ids=as_text, attention_mask=torch.ones_like(as_text), max_new_tokens=4,
                                   return_audio=False)
    assert out.sequences[0, prompt.shape[0] :].tolist() == from_text.sequences[0, as_text.shape[1] :].tolist()


def test_by_default_the_dictation_is_the_greedy_ctc_argmax(dictating):
    model, processor = dictating
    inputs = processor(audio=[noise(1.5, 3)], sampling_rate=16000)
    ids = _clip_log_probs(model, inputs["input_features"]).argmax(-1)
    greedy_ids = ids[EchoXSpeechAdapter.run_starts(ids[None])[0] & (ids != model.config.audio_token_id)]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, return_audio=False)
    assert out.dictation[0].tolist() == greedy_ids.tolist()


def test_a_dictation_search_needs_the_dictation_interface():
    model, processor = build_random_echox("tiny", seed=0)
    inputs = processor(audio=[noise(1.0, 4)], sampling_rate=16000)
    with pytest.raises(ValueError, match="adapter_output='dictation'"):
        model.generate(**inputs, max_new_tokens=2, return_audio=False, dictation_beam_size=4)
    out = model.generate(**inputs, max_new_tokens=2, return_audio=False)  # nothing was left broken
    assert out.dictation is None


def test_bad_dictation_settings_are_refused(dictating):
    model, processor = dictating
    for bad in ({"dictation_beam_size": 0}, {"dictation_lm_weight": -1.0}, {"dictation_lm_weight": "high"},
                {"dictation_length_bonus": "long"}):
        with pytest.raises(ValueError, match="dictation_"):
            EchoXGenerationConfig(**bad).validate()
    inputs = processor(audio=[noise(1.0, 4)], sampling_rate=16000)
    with pytest.raises(ValueError, match="prompt text in front of the speech"):
        model.get_speech_embeddings(inputs["input_features"], dictation_lm_weight=0.5)
