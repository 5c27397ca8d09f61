"""EchoX's generation config: transformers' `GenerationConfig` plus the decoding-time choices of the spoken answer."""

from transformers import GenerationConfig

SEGMENTATION_MODES = ("faithful", "fast")
VOCODING_MODES = ("faithful", "crossfade")

# EchoX's own generation fields and their defaults (the released model's).
ECHOX_GENERATION_FIELDS = {
    "segmentation_mode": "faithful",
    "segment_boundary_token_id": 13,
    "segment_lookahead": 5,
    "segment_min_tokens": 20,
    "segment_score_threshold": 0.1,
    "segment_max_tokens": 50,
    "fast_first_segment_tokens": 3,
    "fast_first_segment_whole_words": True,
    "fast_min_segment_tokens": 8,
    "fast_max_segment_tokens": 24,
    "echo_max_new_tokens": 2048,
    "vocoding_mode": "faithful",
    "dictation_beam_size": 1,
    "dictation_lm_weight": 0.0,
    "dictation_length_bonus": 0.0,
}
# Smallest value of each integer field.
_MINIMUM = {
    "segment_boundary_token_id": 0,
    "segment_lookahead": 0,
    "segment_min_tokens": 0,
    "segment_max_tokens": 1,
    "fast_first_segment_tokens": 1,
    "fast_min_segment_tokens": 1,
    "fast_max_segment_tokens": 1,
    "echo_max_new_tokens": 1,
}


def check_dictation_search(beam_size=None, lm_weight=None, length_bonus=None) -> None:
    """A `ValueError` naming the dictation-search setting (see `EchoXGenerationConfig`) whose value it cannot take;
    `None` means not set."""
    if beam_size is not None and (isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1):
        raise ValueError(f"dictation_beam_size must be an integer >= 1, got {beam_size!r}.")
    if lm_weight is not None and (isinstance(lm_weight, bool) or not isinstance(lm_weight, (int, float)) or lm_weight < 0):
        raise ValueError(f"dictation_lm_weight must be a number >= 0, got {lm_weight!r}.")
    if length_bonus is not None and (isinstance(length_bonus, bool) or not isinstance(length_bonus, (int, float))):
        raise ValueError(f"dictation_length_bonus must be a number, got {length_bonus!r}.")


class EchoXGenerationConfig(GenerationConfig):
    r"""
    The [`GenerationConfig`] of [`EchoXForSpeechToSpeech`] (`generation_config.json`): transformers' text-decoding
    parameters, plus how the answer is spoken. An EchoX field left `None` takes the model's value in `generate` (as
    transformers' own fields do), else the default of `ECHOX_GENERATION_FIELDS` (the released EchoX's). Like the other
    fields, each can also be passed to `generate` directly (`model.generate(..., fast_min_segment_tokens=4)`).

    Segmentation (where the answer is cut into segments that the echo decoder speaks one by one):
        segmentation_mode: `"faithful"` (the released rule, the `segment_*` fields) or `"fast"` (word boundaries, the
            `fast_*` fields).
        segment_boundary_token_id: the token whose LLM output embedding the hidden states are compared with (".").
        segment_lookahead: tokens looked ahead to confirm a peak of the cosine score.
        segment_min_tokens / segment_score_threshold: cut at a peak above the threshold once a segment has this many
            tokens.
        segment_max_tokens: cut at any peak once a segment has this many tokens.
        fast_first_segment_tokens: the "fast" rule's first segment ends at the first word boundary after this many
            tokens.
        fast_first_segment_whole_words: `True`: that boundary is confirmed by the next token (one LLM step later).
            `False`: the first segment is exactly the first `fast_first_segment_tokens` tokens, voiced at once, even
            when they end inside a word.
        fast_min_segment_tokens / fast_max_segment_tokens: later "fast" segments end at punctuation once they hold
            `min` tokens, or at any word boundary once they hold `max`.

    Echo decoding and vocoding:
        echo_max_new_tokens: longest echo-decoder output per segment (unit-language tokens).
        vocoding_mode: `"faithful"` (the released EchoX: each segment vocoded alone, in float32, and the waveforms
            concatenated) or `"crossfade"` (each segment vocoded after 16 units of the one before, whose durations are
            kept, and the last 8 frames of each segment cross-faded with the next one's start: no clicks at the joins).

    Hearing (only with `adapter_output="dictation"`, where the LLM reads the adapter's CTC dictation as its own tokens):
        dictation_beam_size: 1: the dictation is the CTC head's greedy argmax. More: the best of that many prefixes
            in a CTC prefix beam search (`modeling_echox.model.dictation_search`).
        dictation_lm_weight: weight of the LLM's own log-probability of the dictated words (after the prompt text in
            front of the speech) in that search: shallow fusion, which prefers what a user would say. 0: none.
        dictation_length_bonus: added to a prefix's score per dictated token in that search; it offsets the LLM's
            cost of every word, which would otherwise drop the words it finds unlikely (often those asked about).
    """

    def __init__(self, **kwargs):
        for name in ECHOX_GENERATION_FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    def validate(self, strict=False, user_set_attributes=None):
        """`GenerationConfig.validate`, and a `ValueError` naming any EchoX field with a value it cannot take."""
        super().validate(strict=strict, user_set_attributes=user_set_attributes)
        mode = getattr(self, "segmentation_mode", None)
        if mode is not None and mode not in SEGMENTATION_MODES:
            raise ValueError(f"Unknown segmentation mode {mode!r}; use 'faithful' or 'fast'.")
        vocoding = getattr(self, "vocoding_mode", None)
        if vocoding is not None and vocoding not in VOCODING_MODES:
            raise ValueError(f"Unknown vocoding mode {vocoding!r}; use 'faithful' or 'crossfade'.")
        for name, minimum in _MINIMUM.items():
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"EchoXGenerationConfig: {name} must be an integer >= {minimum}, got {value!r}.")
        try:
            check_dictation_search(getattr(self, "dictation_beam_size", None), getattr(self, "dictation_lm_weight", None),
                                   getattr(self, "dictation_length_bonus", None))
        except ValueError as error:
            raise ValueError(f"EchoXGenerationConfig: {error}") from None
        threshold = getattr(self, "segment_score_threshold", None)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError(f"EchoXGenerationConfig: segment_score_threshold must be a number, got {threshold!r}.")
        whole_words = getattr(self, "fast_first_segment_whole_words", None)
        if whole_words is not None and not isinstance(whole_words, bool):
            raise ValueError(
                f"EchoXGenerationConfig: fast_first_segment_whole_words must be True or False, got {whole_words!r}."
            )

    @classmethod
    def from_model_config(cls, model_config) -> "EchoXGenerationConfig":
        """
        `GenerationConfig.from_model_config`, with every EchoX field set: the values an `EchoXConfig` read from a
        `config.json` of the first layout held (`EchoXConfig._generation_defaults`), else the defaults.
        """
        generation_config = cls.from_generation_config(GenerationConfig.from_model_config(model_config))
        for name, value in getattr(model_config, "_generation_defaults", {}).items():
            setattr(generation_config, name, value)
        generation_config.validate()
        generation_config._original_object_hash = hash(generation_config)
        return generation_config

    @classmethod
    def from_generation_config(
        cls, generation_config: GenerationConfig, fallback: GenerationConfig | None = None
    ) -> "EchoXGenerationConfig":
        """
        A new `EchoXGenerationConfig` with every EchoX field set: transformers' fields of `generation_config`, and each
        EchoX field from it (a plain `GenerationConfig`, e.g. read by `GenerationConfig.from_pretrained`, carries them
        as custom attributes), else from `fallback`, else its default.
        """
        values = generation_config.to_dict()
        for name, default in ECHOX_GENERATION_FIELDS.items():
            value = getattr(generation_config, name, None)
            if value is None and fallback is not None:
                value = getattr(fallback, name, None)
            values[name] = default if value is None else value
        return cls.from_dict(values)


__all__ = ["ECHOX_GENERATION_FIELDS", "EchoXGenerationConfig", "check_dictation_search"]
