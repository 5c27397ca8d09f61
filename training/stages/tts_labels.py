"""
Echo-training pseudo labels spoken by a TTS voice: a segment's text is synthesized in the answer voice, and its units
(the stage-0 k-means over the same encoder layer) are encoded in the unit language. An alternative to the paper's
labels (the frozen stage-II echo decoder reading the text), for when that decoder is much less intelligible than the
voice it learnt from (EchoX-mini's comparison of the two is in MODEL_CARD.md).
"""

import json
import os

from modeling_echox.units.extractor import EchoXUnitExtractor
from modeling_echox.units.unit_language import EchoXUnitLanguage


class SpokenUnitLabeler:
    """
    `labeler(texts)` → one list of unit-language indices (0-based) per text: the text spoken by `voice`
    (`training.data.tts_voices.VOICES`), its deduplicated units from the stage-0 output in `units_dir` (k-means +
    `unit_language/`), encoded in the unit language. Texts that are empty after stripping get no units. Each distinct
    text is spoken once per labeler; `spoken_units` (a stage-0 `vocoder_units.jsonl` of speech in this same voice)
    supplies the units of the texts it holds without speaking them again.
    """

    def __init__(self, units_dir: str, voice: str, encoder: str = "whisper-tiny-en:10", spoken_units: str | None = None):
        from training.data.tts_voices import VOICES, voice_available

        from .stage0_units import load_encoder

        if voice not in VOICES:
            raise ValueError(f"Unknown TTS voice {voice!r} for the pseudo labels; choose from {sorted(VOICES)}.")
        if not voice_available(voice):
            raise RuntimeError(f"The TTS voice {voice!r} is not installed (see the Makefile's apt packages).")
        language_dir = os.path.join(units_dir, "unit_language")
        if not os.path.isdir(language_dir):
            raise FileNotFoundError(f"No unit language in {units_dir} (stage 0's output directory is expected).")
        audio_tower, feature_extractor = load_encoder(encoder)
        self.extractor = EchoXUnitExtractor.from_pretrained(units_dir, audio_tower, feature_extractor=feature_extractor)
        self.language = EchoXUnitLanguage.from_pretrained(language_dir)
        self.voice = voice
        self._spoken: dict[str, list[int]] = {}
        if spoken_units:
            with open(spoken_units, encoding="utf-8") as handle:
                for item in map(json.loads, handle):
                    if item["text"].strip() and item["units"]:
                        self._spoken.setdefault(item["text"].strip(), self.language.encode(item["units"]))

    def __call__(self, texts: list[str]) -> list[list[int]]:
        from training.data.tts_voices import synthesize_texts

        cleaned = [text.strip() for text in texts]
        todo = sorted({text for text in cleaned if text and text not in self._spoken})
        if todo:
            for text, audio in zip(todo, synthesize_texts(self.voice, todo), strict=True):
                units, _ = self.extractor(audio)
                self._spoken[text] = self.language.encode(units)
        return [self._spoken[text] if text else [] for text in cleaned]
