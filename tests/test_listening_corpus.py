"""The listening corpus (training/data/listening.py, listening_text.py): sources, voices, plan, augmentation, resume."""

import collections
import json
import os
import shutil

import numpy as np
import pytest

from training.data import listening, listening_text, tts_voices

RESERVED = {"festival_ked": ("festival", "voice_ked_diphone"), "flite_awb": ("flite", "awb"),
            "espeak_us_m3": ("espeak", "en-us+m3"), "espeak_us_f4": ("espeak", "en-us+f4")}


def test_reserved_voices_never_train():
    assert set(listening.RESERVED_VOICES) == set(RESERVED)
    for voice, engine_and_name in RESERVED.items():
        assert tts_voices.VOICES[voice] == engine_and_name
    assert not set(listening.LISTENING_VOICES) & set(RESERVED)
    assert not any(tts_voices.VOICES[v][1].endswith(("+m3", "+f4")) for v in listening.LISTENING_VOICES)
    assert not set(tts_voices.TRAIN_VOICES) & set(RESERVED)
    engines = {tts_voices.VOICES[v][0] for v in listening.LISTENING_VOICES}
    assert engines == {"flite", "festival", "piper", "espeak"} and len(listening.LISTENING_VOICES) >= 20
    with pytest.raises(ValueError, match="reserved"):
        listening.check_training_voices(["flite_slt", "flite_awb"])
    tts_voices.VOICES["espeak_gb_m3"] = ("espeak", "en-gb+m3")  # a reserved variant in another accent
    try:
        with pytest.raises(ValueError, match="reserved"):
            listening.check_training_voices(["espeak_gb_m3"])
    finally:
        del tts_voices.VOICES["espeak_gb_m3"]
    with pytest.raises(ValueError, match="Unknown voices"):
        listening.check_training_voices(["nobody"])


def _sources():
    return {"fortunes": [f"fortune sentence number {i}" for i in range(30)],
            "vocabulary": [f"say word{i} and word{i + 1}" for i in range(30)],
            "templates": [f"where is town {i}" for i in range(30)], "general": ["a general line here"]}


def test_plan_holds_out_sentences_for_the_reserved_voices():
    by_source = _sources()
    train, heldout = listening.plan_corpus(by_source, held_out=10, seed=0)
    assert (train, heldout) == listening.plan_corpus(by_source, held_out=10, seed=0)
    assert train != listening.plan_corpus(by_source, held_out=10, seed=1)[0]
    held_texts = {job["text"] for job in heldout}
    assert len(held_texts) == 10 and held_texts <= set(by_source["fortunes"] + by_source["templates"])
    assert not held_texts & {job["text"] for job in train}
    assert len(train) == 91 - 10
    assert collections.Counter(job["voice"] for job in heldout) == {voice: 10 for voice in RESERVED}
    assert all(job["augment"] is None for job in heldout)
    assert {job["voice"] for job in train} <= set(listening.LISTENING_VOICES) and len({j["voice"] for j in train}) > 8
    assert all(job["augment"] and "room" in job["augment"] for job in train)
    assert len({job["audio"] for job in train + heldout}) == len(train) + len(heldout)
    assert [job["source"] for job in train] != sorted(job["source"] for job in train)  # shuffled: a prefix mixes
    with pytest.raises(ValueError, match="reserved"):
        listening.plan_corpus(by_source, voices=("flite_slt", "festival_ked"))
    # a probe's unheard word leaves training (plurals too), the rest keeps its order and the held-out set stays
    kept, same_heldout = listening.plan_corpus(by_source, held_out=10, unheard={"town"}, seed=0)
    assert same_heldout == heldout and kept == [job for job in train if "town" not in job["text"].split()]
    assert len(kept) < len(train)


def test_unheard_probe_words_are_the_rarest_word_of_each_probe():
    words = listening.unheard_probe_words()
    assert {"capybara", "timbuktu", "pooh"} <= words and not {"the", "winnie", "harry"} & words


def test_corpus_text():
    assert listening_text.corpus_text("Don't pay $42 to 'Zoë' -- ever!") == "don't pay forty two to zoe ever"
    assert listening_text.corpus_text("It's 3.5 km") == "it's three five km"


def test_fortune_sentences_keep_plain_prose(tmp_path):
    for name in listening_text.FORTUNE_FILES:
        (tmp_path / name).write_text("")
    (tmp_path / "wisdom").write_text(
        "The early bird gets the worm. But the second mouse gets the cheese!\n"
        "\t\t-- Somebody Famous\n%\nint main() { return 0; } is a program here\n%\nToo short.\n")
    assert listening_text.fortune_sentences(directory=str(tmp_path)) == [
        "but the second mouse gets the cheese", "the early bird gets the worm"]
    assert listening_text.fortune_sentences({"worm"}, directory=str(tmp_path)) == [
        "but the second mouse gets the cheese"]
    with pytest.raises(FileNotFoundError, match="fortunes"):
        listening_text.fortune_sentences(directory=str(tmp_path / "missing"))


def test_vocabulary_and_its_coverage_lines():
    words = listening_text.vocabulary(3000, excluded={"house"})
    assert len(words) > 2000 and "house" not in words and "people" in words
    assert all(w.isalpha() and w.islower() for w in words)
    profane = listening_text._profane()
    assert not any(w in profane or (w.endswith("s") and w[:-1] in profane) for w in words)
    lines = listening_text.coverage_sentences(words[:500], repeats=2, seed=0)
    counts = collections.Counter(w for line in lines for w in line.split())
    assert all(counts[w] >= 2 for w in words[:500])
    assert all(4 <= len(line.split()) <= 12 for line in lines)


def test_templates_are_distinct_and_exclude_words():
    sentences = listening_text.templated_sentences(300, excluded={"monday"}, seed=0)
    assert len(set(sentences)) == 300 and sentences == listening_text.templated_sentences(300, {"monday"}, seed=0)
    assert not any("monday" in s.split() for s in sentences)
    assert all(s == listening_text.corpus_text(s) for s in sentences)


def test_room_and_augmentation_are_deterministic():
    response = listening.room_response(0.3, 6.0, seed=1)
    assert response[0] == 1.0 and len(response) == int(0.3 * 16000)
    assert abs(np.sum(response[1:] ** 2) - 10 ** -0.6) < 1e-4
    audio = np.sin(np.arange(16000) / 20).astype(np.float32) * 0.3
    params = {"tempo": 1.0, "pitch": 0, "snr_db": 20.0, "gain_db": -3.0, "noise_seed": 5,
              "room": {"rt60": 0.4, "drr_db": 3.0, "seed": 2}}
    first, second = listening.augment(audio, params), listening.augment(audio, params)
    assert np.array_equal(first, second) and first.shape == audio.shape and not np.allclose(first, audio)
    assert np.array_equal(listening.augment(audio, None), audio)


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")
def test_speaking_resumes_by_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(listening, "CHUNK_SIZE", 2)
    jobs = [{"id": f"j{i}", "text": f"hello number {i}", "voice": "flite_slt", "source": "templates",
             "audio": f"listening/train/flite_slt/{i}.wav", "augment": None} for i in range(3)]
    lines = listening.speak(jobs, str(tmp_path), "train", workers=1, verbose=False)
    assert [line["id"] for line in lines] == ["j0", "j1", "j2"] and all(line["duration"] > 0.2 for line in lines)
    chunks = sorted(os.listdir(tmp_path / "listening" / "chunks"))
    assert len(chunks) == 2 and chunks[0].startswith("train-00000-")
    monkeypatch.setattr(tts_voices, "synthesize_texts", lambda *a: (_ for _ in ()).throw(AssertionError("spoken")))
    assert listening.speak(jobs, str(tmp_path), "train", workers=1, verbose=False) == lines
    # a changed plan makes new chunks, but the clips already spoken are reused
    (tmp_path / "listening" / "chunks" / chunks[1]).unlink()
    assert listening.speak(jobs[::-1], str(tmp_path), "train", workers=1, verbose=False)[0]["id"] == "j2"
    stats = listening.corpus_stats(str(tmp_path), lines, [])
    assert stats["train"]["clips"] == 3 and stats["engine_clips_per_second"]["flite"] > 0
    manifest = tmp_path / "listening.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = listening.stage_records(str(manifest))
    assert [r["transcript"] for r in records] == [r["response"] for r in records] == [j["text"] for j in jobs]
    assert all(r["prompt"] == listening.LISTEN_PROMPT and os.path.isabs(r["audio"]) for r in records)
