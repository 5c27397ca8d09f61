"""The EchoX-mini spoken-QA generator (text side) and synthesizer (flite only here)."""

import collections
import json
import os
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("countryinfo")
pytest.importorskip("num2words")

from training.data import spoken_qa, synthesize, tts_voices  # noqa: E402


@pytest.fixture(scope="module")
def records():
    return spoken_qa.generate_qa(seed=0)


def test_kinds_splits_and_fields(records):
    assert {r["kind"] for r in records} == set(spoken_qa.KINDS)
    assert {r["split"] for r in records} == set(spoken_qa.SPLITS)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for record in records:
        assert set(record) >= {"id", "kind", "question", "answer", "answers", "split", "item", "phrasing"}
        for text in (record["question"], record["answer"], *record["answers"]):
            assert text == text.strip() and text.isascii()
        assert record["question"] == spoken_qa.normalize_text(record["question"])
        assert record["answer"] == spoken_qa.normalize_text(record["answer"])
        # the spoken answer contains its (first) gold string
        assert record["answers"][0] in record["answer"], record


def test_country_split_has_no_overlap(records):
    countries = collections.defaultdict(set)
    for record in records:
        country = spoken_qa.country_of(record)
        if country is not None:
            countries[record["split"]].add(country)
    assert countries["train"] and countries["test"]
    assert not countries["train"] & countries["test"]
    assert not countries["train"] & countries["dev"]
    assert not countries["dev"] & countries["test"]
    # every continent has held-out countries
    continent_of = {c["country"]: c["continent"] for c in spoken_qa.load_countries()}
    assert {continent_of[c] for c in countries["test"]} == set(spoken_qa.CONTINENT_GOLD)
    # held-out country names never appear in a training question either
    train_questions = " ".join(r["question"] for r in records if r["split"] == "train")
    leaked = [c for c in countries["test"] if f" {c} " in f" {train_questions} " and not any(
        c in t for t in countries["train"])]
    assert not leaked


def test_closed_split_by_phrasing_holds_out_one_phrasing():
    records = spoken_qa.generate_qa(seed=0, closed_split="phrasing")
    by_item = collections.defaultdict(list)
    for record in records:
        by_item[record["item"]].append(record)
    for item, group in by_item.items():
        assert len({r["answer"] for r in group}) == 1, item
        assert len({r["question"] for r in group}) == len(group) >= 3, item
        splits = collections.Counter(r["split"] for r in group)
        if group[0]["kind"] in ("capital", "continent"):
            assert len(splits) == 1, item  # a country's questions share its split
        else:  # a closed-set fact is taught, and at most one phrasing of it is held out per split
            assert splits["train"] >= 1 and splits["test"] <= 1 and splits["dev"] <= 1, item
    for kind in ("day", "month"):  # small sets: every item is asked in test, in a phrasing never trained on
        items = {r["item"] for r in records if r["kind"] == kind}
        assert {r["item"] for r in records if r["kind"] == kind and r["split"] == "test"} == items
    arithmetic = {r["item"] for r in records if r["kind"] == "arithmetic"}
    tested = {r["item"] for r in records if r["kind"] == "arithmetic" and r["split"] == "test"}
    assert len(tested) == round(0.2 * len(arithmetic))
    train_questions = {r["question"] for r in records if r["split"] == "train"}
    assert not train_questions & {r["question"] for r in records if r["split"] != "train"}


def test_closed_split_by_item_holds_out_whole_items(records):
    by_item = collections.defaultdict(set)
    assert spoken_qa.generate_qa(seed=0, closed_split="item") == records  # the default
    for record in records:
        by_item[record["item"]].add(record["split"])
    assert all(len(splits) == 1 for splits in by_item.values())
    for kind in ("day", "month", "arithmetic"):
        assert {"train", "test"} <= {r["split"] for r in records if r["kind"] == kind}, kind
    # the country split is the same under both rules
    by_phrasing = spoken_qa.generate_qa(seed=0, closed_split="phrasing")
    assert [r for r in records if spoken_qa.country_of(r)] == [r for r in by_phrasing if spoken_qa.country_of(r)]
    with pytest.raises(ValueError, match="closed_split"):
        spoken_qa.generate_qa(closed_split="voice")


def test_examples_and_determinism(records):
    by_id = {r["id"]: r for r in records}
    kenya = by_id["capital-kenya-p0"]
    assert kenya["question"] == "what is the capital of kenya"
    assert kenya["answer"] == "the capital of kenya is nairobi" and kenya["answers"] == ["nairobi"]
    assert by_id["continent-kenya-p0"]["answers"] == ["africa"]
    assert by_id["continent-brazil-p0"]["answers"] == ["south america"]
    assert by_id["day-after-sunday-p0"]["answers"] == ["monday"]
    assert by_id["month-before-january-p1"]["answer"] == "the month before january is december"
    seven = by_id["arithmetic-3-plus-4-p0"]
    assert seven["question"] == "what is three plus four" and seven["answers"] == ["seven", "7"]
    assert by_id["arithmetic-7-times-3-p0"]["answers"] == ["twenty one", "21"]
    assert spoken_qa.generate_qa(seed=0) == records
    other = {r["item"]: r["split"] for r in spoken_qa.generate_qa(seed=1)}
    assert other != {r["item"]: r["split"] for r in records}
    # capitals that would be answered by echoing the question are not asked
    assert "capital-luxembourg-p0" not in by_id and "continent-luxembourg-p0" in by_id


def test_jsonl_roundtrip_and_cli(tmp_path, records, capsys):
    path = str(tmp_path / "qa.jsonl")
    spoken_qa.main(["--out", path, "--kinds", "day,month"])
    lines = spoken_qa.read_jsonl(path)
    assert lines and {r["kind"] for r in lines} == {"day", "month"}
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Unknown kinds"):
        spoken_qa.generate_qa(kinds=("colour",))


def test_plan_jobs_voices(records):
    jobs = synthesize.plan_jobs(records[:0] + [r for r in records if r["kind"] == "day"])
    for job in jobs:
        if job["record"]["split"] == "train":
            assert job["voice"] in tts_voices.TRAIN_VOICES and job["augment"] is not None
        else:
            assert job["voice"] in tts_voices.HELDOUT_VOICES and job["augment"] is None
    assert not set(tts_voices.TRAIN_VOICES) & set(tts_voices.HELDOUT_VOICES)
    with pytest.raises(ValueError, match="both training and held-out"):
        synthesize.plan_jobs(records[:1], train_voices=("flite_awb",), heldout_voices=("flite_awb",))


def test_plan_jobs_voices_per_kind(records):
    days = [r for r in records if r["kind"] == "day" and r["split"] == "train"][:3]
    two = synthesize.plan_jobs(days, voices_per_record=2)
    every = synthesize.plan_jobs(days, voices_per_record=2, voices_per_kind={"day": 6})
    assert len(two) == 6 and len(every) == 18
    for record in days:  # more voices add to the ones a record had, with the same augmentation
        had = [j for j in two if j["record"] is record]
        has = [j for j in every if j["record"] is record]
        assert {j["voice"] for j in has} == set(tts_voices.TRAIN_VOICES)
        assert [(j["voice"], j["augment"]) for j in has[:2]] == [(j["voice"], j["augment"]) for j in had]
    assert synthesize.parse_voices_per_kind("day=6, month=6") == {"day": 6, "month": 6}
    assert synthesize.parse_voices_per_kind("") == {}
    with pytest.raises(ValueError, match="kind=count"):
        synthesize.parse_voices_per_kind("day=0")


def test_augment_changes_length_and_keeps_range():
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(16000) * 0.05) * rng.uniform(0.5, 1, 16000)).astype(np.float32)
    params = {"tempo": 1.2, "pitch": 100, "snr_db": 10.0, "gain_db": 0.0, "noise_seed": 1}
    out = synthesize.augment(audio, params)
    assert out.dtype == np.float32 and np.abs(out).max() <= 0.99 + 1e-6
    assert abs(len(out) / len(audio) - 1 / 1.2) < 0.05
    np.testing.assert_array_equal(out, synthesize.augment(audio, params))


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")
def test_synthesize_two_items_with_flite(tmp_path, records):
    picked = [next(r for r in records if r["split"] == "train"), next(r for r in records if r["split"] == "test")]
    manifests = synthesize.synthesize_dataset(
        picked,
        str(tmp_path),
        answer_voice="flite_slt",
        workers=1,
        train_voices=("flite_kal16",),
        heldout_voices=("flite_awb",),
        voices_per_record=1,
        verbose=False,
    )
    assert set(manifests) == {"train", "test"}
    import soundfile as sf

    for split, path in manifests.items():
        (line,) = [json.loads(x) for x in open(path, encoding="utf-8")]
        assert set(line) >= {"id", "audio", "answers", "question", "answer_text", "answer_audio"}
        assert line["voice"] == ("flite_kal16" if split == "train" else "flite_awb")
        for key in ("audio", "answer_audio"):
            audio, rate = sf.read(tmp_path / line[key])
            assert rate == 16000 and audio.ndim == 1 and 0.5 < len(audio) / rate < 10
            assert np.abs(audio).max() > 0.05
        assert (line["augment"] is not None) == (split == "train")


def test_read_speech_never_names_a_held_out_country(records):
    from training.data.general_reading import general_sentences
    from training.data.reading import held_out_words, reading_sentences

    excluded = held_out_words(records)
    test_countries = {spoken_qa.country_of(r) for r in records if r["split"] == "test"} - {None}
    assert excluded and any(set(country.split()) & excluded for country in test_countries)
    general = general_sentences(300, excluded, seed=3)
    assert general == general_sentences(300, excluded, seed=3) != general_sentences(300, excluded, seed=4)
    assert len(set(general)) == 300 and all(re.fullmatch(r"[a-z ]+", s) for s in general)
    for sentences in (general, reading_sentences(records)):
        assert not any(excluded & set(s.split()) for s in sentences)
    # a word made held out is dropped from the general sentences
    common = collections.Counter(w for s in general for w in s.split()).most_common(1)[0][0]
    assert not any(common in s.split() for s in general_sentences(300, excluded | {common}, seed=3))


def test_recipe_step_reruns_when_an_input_is_newer(tmp_path):
    from training.echox_mini import _done

    source, output = tmp_path / "general.jsonl", tmp_path / "dialogues.jsonl"
    assert not _done(str(output))
    output.write_text("x")
    source.write_text("y")
    os.utime(output, (100, 100))
    os.utime(source, (200, 200))
    assert _done(str(output)) and not _done(str(output), [str(source)])
    os.utime(output, (300, 300))
    assert _done(str(output), [str(source), str(tmp_path / "missing.jsonl")])


def test_t2c_manifest_holds_every_answer_voice_clip(tmp_path):
    from modeling_echox.units.unit_language import train_unit_language
    from training.mini_manifests import t2c_manifest

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 20, size=int(rng.integers(5, 30))).tolist() for _ in range(40)]
    language = train_unit_language(sequences, 40, "bpe", num_units=20)
    language.save_pretrained(str(tmp_path / "unit_language"))
    items = [{"audio": "a.wav", "text": "the capital of kenya is nairobi", "units": sequences[0]},
             {"audio": "b.wav", "text": "a general sentence read aloud", "units": sequences[1]},
             {"audio": "c.wav", "text": "", "units": sequences[2]}]  # no text: nothing to learn from
    (tmp_path / "vocoder_units.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    path = t2c_manifest(str(tmp_path), str(tmp_path / "t2c.jsonl"))
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [row["response"] for row in rows] == [items[0]["text"], items[1]["text"]]
    assert [row["units"] for row in rows] == [language.encode(sequences[0]), language.encode(sequences[1])]
    assert len({row["id"] for row in rows}) == 2
