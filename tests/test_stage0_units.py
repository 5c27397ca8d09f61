"""Stage 0: spoken answers → k-means units → unit language → manifests that stage II trains on."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from modeling_echox.units.unit_language import EchoXUnitLanguage
from training.stages import stage0_units
from training.stages.common import load_config

ANSWERS = ["the capital of kenya is nairobi", "monday comes after sunday", "two plus two is four", "the sky is blue"]


def _speak(text: str, path: str, seed: int) -> None:
    if shutil.which("flite"):
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", path], check=True)
    else:  # distinct tone patterns
        t = np.arange(16000) / 16000
        soundfile.write(path, (0.1 * np.sin(2 * np.pi * (200 + 60 * seed) * t * (1 + t))).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("answers")
    records = []
    for index, text in enumerate(ANSWERS):
        _speak(text, str(directory / f"a{index}.wav"), index)
        records.append({"id": f"q{index}", "audio": f"a{index}.wav", "transcript": text, "response": text,
                        "answer_audio": f"a{index}.wav"})
    manifest = directory / "answers.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(manifest)


def test_stage0_writes_units_language_and_manifests_and_resumes(answers, tmp_path):
    out = str(tmp_path / "stage0")
    config = load_config(None, stage0_units.DEFAULTS, [f"manifests={json.dumps([answers])}", f"output_dir={json.dumps(out)}",
                                                         "num_units=16", 'unit_language={"vocab_size": 30, "model_type": "bpe"}'])
    summary = stage0_units.main(config)
    assert summary["answers"] == 4 and summary["num_units"] == 16
    assert 0 < summary["tokens_per_unit"] < 1  # BPE merges units into longer pieces
    items = [json.loads(line) for line in open(os.path.join(out, "vocoder_units.jsonl"))]
    language = EchoXUnitLanguage.from_pretrained(os.path.join(out, "unit_language"))
    dialogues = {d["id"]: d for d in map(json.loads, open(os.path.join(out, "dialogues.jsonl")))}
    for item in items:
        assert len(item["units"]) == len(item["durations"]) and min(item["durations"]) >= 1
        assert all(a != b for a, b in zip(item["units"], item["units"][1:]))  # deduplicated
        assert item["text"] in ANSWERS
    for record in dialogues.values():
        item = next(i for i in items if i["audio"].endswith(os.path.basename(record["answer_audio"])))
        assert language.decode(record["units"]) == item["units"]  # lossless unit language
    # a second run reuses every step's output
    stamps = {name: os.path.getmtime(os.path.join(out, name)) for name in ("unit_kmeans.safetensors", "vocoder_units.jsonl")}
    assert stage0_units.main(config)["tokens_per_unit"] == summary["tokens_per_unit"]
    assert stamps == {name: os.path.getmtime(os.path.join(out, name)) for name in stamps}


def test_stage0_adds_units_of_answers_added_later(answers, tmp_path):
    """A manifest added to a finished stage 0 (e.g. answer fragments): its answers get units; nothing else is redone."""
    first = [json.loads(line) for line in open(answers)]
    head = tmp_path / "head.jsonl"
    head.write_text("".join(json.dumps({**r, "answer_audio": os.path.join(os.path.dirname(answers), r["answer_audio"])}) + "\n"
                            for r in first[:3]))
    tail = tmp_path / "tail.jsonl"
    tail.write_text(json.dumps({**first[3], "answer_audio": os.path.join(os.path.dirname(answers), first[3]["answer_audio"])}) + "\n")
    out = str(tmp_path / "stage0")
    settings = [f"output_dir={json.dumps(out)}", "num_units=16", 'unit_language={"vocab_size": 30, "model_type": "bpe"}']
    stage0_units.main(load_config(None, stage0_units.DEFAULTS, [f"manifests={json.dumps([str(head)])}", *settings]))
    kmeans = os.path.getmtime(os.path.join(out, "unit_kmeans.safetensors"))
    before = {i["audio"]: i for i in map(json.loads, open(os.path.join(out, "vocoder_units.jsonl")))}
    summary = stage0_units.main(load_config(None, stage0_units.DEFAULTS,
                                            [f"manifests={json.dumps([str(head), str(tail)])}", *settings]))
    after = {i["audio"]: i for i in map(json.loads, open(os.path.join(out, "vocoder_units.jsonl")))}
    assert summary["answers"] == 4 and len(after) == 4 and all(after[a] == item for a, item in before.items())
    assert os.path.getmtime(os.path.join(out, "unit_kmeans.safetensors")) == kmeans
    assert len(list(open(os.path.join(out, "dialogues.jsonl")))) == 4


def test_stage0_vocoder_manifests_only_add_vocoder_units(answers, tmp_path):
    """Speech for the vocoder alone gets units, but fits neither the k-means nor the unit language, nor dialogues."""
    records = [json.loads(line) for line in open(answers)]
    absolute = [{**r, "answer_audio": os.path.join(os.path.dirname(answers), r["answer_audio"])} for r in records]
    head, extra = tmp_path / "head.jsonl", tmp_path / "extra.jsonl"
    head.write_text("".join(json.dumps(r) + "\n" for r in absolute[:3]))
    extra.write_text(json.dumps(absolute[3]) + "\n")
    settings = ["num_units=16", 'unit_language={"vocab_size": 30, "model_type": "bpe"}', f"manifests={json.dumps([str(head)])}"]
    alone, with_extra = str(tmp_path / "alone"), str(tmp_path / "with_extra")
    stage0_units.main(load_config(None, stage0_units.DEFAULTS, [*settings, f"output_dir={json.dumps(alone)}"]))
    summary = stage0_units.main(load_config(None, stage0_units.DEFAULTS, [
        *settings, f"output_dir={json.dumps(with_extra)}", f"vocoder_manifests={json.dumps([str(extra)])}"]))
    units = {i["audio"]: i for i in map(json.loads, open(os.path.join(with_extra, "vocoder_units.jsonl")))}
    assert summary["answers"] == 4 and absolute[3]["answer_audio"] in units
    assert units[absolute[3]["answer_audio"]]["text"] == absolute[3]["response"]
    assert len(list(open(os.path.join(with_extra, "dialogues.jsonl")))) == 3
    for name in ("unit_kmeans.safetensors", "unit_language/unit_language.model"):
        assert open(os.path.join(alone, name), "rb").read() == open(os.path.join(with_extra, name), "rb").read()


def test_stage0_refuses_records_without_spoken_answers(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "x", "response": "hi"}) + "\n")
    config = load_config(None, stage0_units.DEFAULTS, [f"manifests={json.dumps([str(manifest)])}"])
    with pytest.raises(ValueError, match="answer_audio"):
        stage0_units.main(config)
