"""Echo-training pseudo labels spoken by a TTS voice (training/stages/tts_labels.py)."""

import json
import shutil

import pytest

from training.data import synthesize, tts_voices
from training.stages import stage0_units
from training.stages.common import load_config
from training.stages.tts_labels import SpokenUnitLabeler

pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed (make installs it)")
ANSWERS = ["the capital of kenya is nairobi", "two plus two is four", "monday comes after sunday"]


@pytest.fixture(scope="module")
def units_dir(tmp_path_factory):
    """Stage 0 (random tiny encoder, 16 units) on the answers spoken by flite slt."""
    directory = tmp_path_factory.mktemp("answers")
    records = []
    for index, audio in enumerate(tts_voices.synthesize_texts("flite_slt", ANSWERS)):
        synthesize.write_wav(str(directory / f"a{index}.wav"), audio)
        records.append({"id": f"q{index}", "answer_audio": f"a{index}.wav", "response": ANSWERS[index]})
    (directory / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(directory / "stage0")
    config = load_config(None, stage0_units.DEFAULTS, [
        f"manifests={json.dumps([str(directory / 'answers.jsonl')])}", f"output_dir={json.dumps(out)}", "num_units=16",
        'unit_language={"vocab_size": 30, "model_type": "bpe"}'])
    stage0_units.main(config)
    return out


def test_labels_are_the_units_of_the_spoken_text(units_dir, monkeypatch):
    labeler = SpokenUnitLabeler(units_dir, "flite_slt", encoder="random:tiny")
    spoken = []
    original = tts_voices.synthesize_texts
    monkeypatch.setattr(tts_voices, "synthesize_texts", lambda voice, texts: spoken.extend(texts) or original(voice, texts))
    labels = labeler([" two plus two is four", "", "the capital of kenya is nairobi", "two plus two is four"])
    assert sorted(spoken) == sorted(["two plus two is four", "the capital of kenya is nairobi"])  # once each
    assert labels[1] == [] and labels[0] == labels[3] and labels[0] != labels[2]
    units, _ = labeler.extractor(original("flite_slt", ["two plus two is four"])[0])
    assert labeler.language.decode(labels[0]) == units.tolist()
    assert all(0 <= index < len(labeler.language) for label in labels for index in label)


def test_bad_settings_are_named(units_dir, tmp_path):
    with pytest.raises(ValueError, match="Unknown TTS voice"):
        SpokenUnitLabeler(units_dir, "nobody", encoder="random:tiny")
    with pytest.raises(FileNotFoundError, match="unit language"):
        SpokenUnitLabeler(str(tmp_path), "flite_slt", encoder="random:tiny")


def test_known_speech_is_not_spoken_again(units_dir, tmp_path, monkeypatch):
    known = tmp_path / "vocoder_units.jsonl"
    known.write_text(json.dumps({"audio": "x.wav", "text": "two plus two is four ", "units": [1, 2, 3], "durations": [1, 1, 1]})
                     + "\n")
    labeler = SpokenUnitLabeler(units_dir, "flite_slt", encoder="random:tiny", spoken_units=str(known))
    spoken = []
    original = tts_voices.synthesize_texts
    monkeypatch.setattr(tts_voices, "synthesize_texts", lambda voice, texts: spoken.extend(texts) or original(voice, texts))
    labels = labeler(["two plus two is four", "the sky is blue"])
    assert spoken == ["the sky is blue"]
    assert labels[0] == labeler.language.encode([1, 2, 3])
