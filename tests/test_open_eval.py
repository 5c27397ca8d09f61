"""The open evaluation set (training.data.open_questions); `echox eval`'s retention, hearing and dictation figures."""

import json
import shutil
import types

import numpy as np
import pytest
import soundfile
import torch

pytest.importorskip("countryinfo")
pytest.importorskip("num2words")

from modeling_echox import cli  # noqa: E402
from modeling_echox.evaluation.spoken_qa import (  # noqa: E402
    adapter_dictation,
    evaluate_spoken_qa,
    read_eval_manifest,
)
from modeling_echox.evaluation.text_metrics import normalize_text, word_error_rate  # noqa: E402
from modeling_echox.model.speech_adapter import SpeechAdapterOutput  # noqa: E402
from modeling_echox.testing.random_checkpoint import build_random_echox  # noqa: E402
from training.data import open_questions, spoken_qa  # noqa: E402

# ------------------------------------------------------------------------------------------------ the open set


@pytest.fixture(scope="module")
def qa_records():
    return spoken_qa.generate_qa(closed_split="phrasing")  # what the recipe's qa step writes


@pytest.fixture(scope="module")
def recipe_texts(qa_records):
    """The recipe's answer-voice sentences: general (its default count and seed), reading, fragments. (The listening
    corpus is checked when the recipe builds the set: `open_set` gets its manifest.)"""
    pytest.importorskip("faker")
    from training.data.fragments import fragment_texts
    from training.data.general_reading import general_sentences
    from training.data.reading import held_out_words, reading_sentences

    general = general_sentences(2000, held_out_words(qa_records), 0)
    return general + reading_sentences(qa_records) + fragment_texts(qa_records)


def test_committed_set_size_and_fields():
    records = open_questions.load_open_questions()
    everyday = [r for r in records if r["kind"] != open_questions.SMALL_TALK and not r["kind"].startswith("probe_")]
    kinds = {r["kind"] for r in everyday}
    assert len(everyday) >= 300 and len(kinds) >= 30
    assert all(sum(r["kind"] == kind for r in everyday) >= 10 for kind in kinds)
    assert sum(r["kind"] == open_questions.SMALL_TALK for r in records) >= 10
    probes = [r for r in records if r["kind"].startswith("probe_")]
    assert len(probes) >= 30 and all(r.get("probe") for r in probes)
    assert len({r["id"] for r in records}) == len(records)


def test_committed_set_shares_nothing_with_the_recipes_training_data(qa_records, recipe_texts):
    records = open_questions.load_open_questions() + open_questions.country_probes(qa_records)
    prompts, texts = open_questions.training_texts(qa_records)
    assert open_questions.check_open_set(records, prompts, texts + recipe_texts) == []


def test_country_probes_are_the_held_out_countries(qa_records):
    probes = open_questions.country_probes(qa_records)
    train = {spoken_qa.country_of(r) for r in qa_records if r["split"] == "train" and spoken_qa.country_of(r)}
    test_items = {r["item"] for r in qa_records if r["split"] == "test" and r["kind"] in ("capital", "continent")}
    assert len(probes) == len(test_items)
    assert {p["kind"] for p in probes} == {"probe_capital", "probe_continent"}
    assert not {p["probe"] for p in probes} & train
    assert probes == open_questions.country_probes(qa_records)  # seeded


def test_content_words_and_stop_words():
    assert open_questions.content_words("What is the colour of the sky?") == {"colour", "sky"}
    assert open_questions.content_words("how many legs does a spider have") == {"leg", "spider"}
    assert open_questions.fold("boxes") == "box" and open_questions.fold("berries") == "berry"
    assert open_questions.fold("bus") == "bus" and open_questions.fold("glass") == "glass"


def _record(question, answers, kind="animals", probe=None):
    return {"id": f"{kind}-x", "kind": kind, "question": question, "answers": answers,
            **({"probe": probe} if probe else {})}


def test_checker_refuses_a_word_shared_with_a_training_prompt():
    prompts = ["what is the capital of kenya", "which continent is peru in"]
    clean = _record("how many legs does a spider have", ["eight"])
    assert open_questions.check_open_set([clean], prompts, prompts) == []
    shared = _record("what is the capital of the moon", ["none"])  # "capital"
    plural = _record("how many continents are there", ["seven"])  # "continents" = "continent"
    problems = open_questions.check_open_set([clean, shared, plural], prompts, prompts)
    assert [problem["rule"] for problem in problems] == [1, 1]
    assert "['capital']" in problems[0]["problem"] and "['continent']" in problems[1]["problem"]


def test_checker_refuses_a_fact_read_aloud_but_not_its_words():
    question = _record("how many legs does a spider have", ["eight"])
    heard_words = ["the spider climbed on my legs"]  # the words, not the answer: allowed
    assert open_questions.check_open_set([question], [], heard_words) == []
    taught = ["every spider has eight hairy legs"]
    assert open_questions.check_open_set([question], [], taught) == [
        {"id": "animals-x", "rule": 2, "problem": f"{question['question']!r} is answered by the training text "
                                                  f"{taught[0]!r}"}]


def test_checker_refuses_probe_names_heard_in_training():
    probe = _record("who was socrates", ["philosopher"], "probe_person", "socrates")
    assert open_questions.check_open_set([probe], [], ["a man sat down"]) == []
    assert open_questions.check_open_set([probe], [], ["socrates said hello"])[0]["rule"] == 3
    name = _record("where is the eiffel tower", ["paris"], "probe_place", "eiffel tower")
    assert open_questions.check_open_set([name], [], ["the tower fell"]) == []  # "eiffel" is unheard
    assert open_questions.check_open_set([name], [], ["eiffel built a tower"])[0]["rule"] == 3


def test_open_set_leaves_out_what_training_holds(tmp_path, qa_records, monkeypatch):
    table = {"animals": [{"question": "how many legs does a spider have", "answers": ["eight"]},
                         {"question": "what is the capital of the moon", "answers": ["none"]},  # rule 1
                         {"question": "who wrote romeo and juliet", "answers": ["shakespeare"], "probe": "romeo"}],
             "probe_person": [{"question": "who was socrates", "answers": ["philosopher"], "probe": "socrates"},
                              {"question": "who was hatshepsut", "answers": ["pharaoh"], "probe": "hatshepsut"}]}
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(table))
    texts = tmp_path / "read.jsonl"
    texts.write_text(json.dumps({"text": "socrates met romeo"}) + "\n")
    monkeypatch.setattr(open_questions, "MIN_EVERYDAY", 2)
    monkeypatch.setattr(open_questions, "MIN_KINDS", 1)
    kept, refused = open_questions.open_set(qa_records, [str(texts)], questions_file=str(questions))
    assert [(p["id"], p["rule"]) for p in refused] == [("animals-01", 1), ("animals-02", 3), ("probe_person-00", 3)]
    hand_written = [record for record in kept if record["kind"] in ("animals", "probe_person")]
    assert [record["id"] for record in hand_written] == ["animals-00", "animals-02", "probe_person-01"]
    assert "probe" not in hand_written[1]  # the question stays, its heard name is no probe
    assert len(kept) == 3 + len(open_questions.country_probes(qa_records))
    monkeypatch.setattr(open_questions, "MIN_EVERYDAY", 3)
    with pytest.raises(ValueError, match="Only 2 everyday questions over 1 kinds"):
        open_questions.open_set(qa_records, [str(texts)], questions_file=str(questions))


@pytest.mark.parametrize(
    "item, message",
    [
        ({"question": "who is there", "answers": ["me"]}, "content word"),
        ({"question": "what do bees make", "answers": []}, "non-empty list"),
        ({"question": "what do bees make", "answers": ["honey"], "probe": ""}, "probe"),
        ({"question": "what color is a red apple", "answers": ["red"]}, "in the question itself"),
    ],
)
def test_question_file_validation(tmp_path, item, message):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps({"animals": [item]}))
    with pytest.raises(ValueError, match=message):
        open_questions.load_open_questions(str(path))


def test_synthesis_is_reserved_voices_only_and_writes_an_eval_manifest(tmp_path):
    records = [_record("what sound does a cow make", ["moo"]), _record("who was socrates", ["philosopher"],
                                                                      "probe_person", "socrates")]
    records[1]["id"] = "probe_person-00"
    with pytest.raises(ValueError, match="training voices"):
        open_questions.synthesize_open_set(records, str(tmp_path), voices=("flite_slt",))
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    path = open_questions.synthesize_open_set(records, str(tmp_path), voices=("flite_awb",), workers=1)
    loaded = read_eval_manifest(path)
    assert [r["id"] for r in loaded] == ["animals-x-flite_awb", "probe_person-00-flite_awb"]
    assert loaded[1]["probe"] == "socrates" and loaded[1]["voice"] == "flite_awb" and loaded[0]["duration"] > 0.3


# ------------------------------------------------------------------------------------------------ the figures


def _clip(tmp_path, name, seconds, seed):
    audio = 0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32)
    soundfile.write(tmp_path / name, audio, 16000)
    return str(tmp_path / name)


class _Transcriber:
    def __init__(self, text):
        self.text = text

    def __call__(self, audio):
        return self.text


class _FixedLLM:
    def __init__(self, answers):
        self.answers = answers

    def __call__(self, questions):
        return [self.answers[q] for q in questions]


@pytest.fixture(scope="module")
def tiny():
    return build_random_echox("tiny")


def test_retention_hearing_and_dictation(tmp_path, tiny):
    model, processor = tiny
    questions = ["capital of france", "after monday", "capital of italy", "before friday"]
    records = [{"id": f"q{i}", "audio": _clip(tmp_path, f"{i}.wav", 0.5 + 0.2 * i, i), "answers": ["xyzzy"],
                "question": question, "kind": "a" if i < 2 else "b", "voice": "v"}
               for i, question in enumerate(questions)]
    # what the random model says to each clip; gold answers are then chosen to make s2t right for q0, q1, q2 only
    first = evaluate_spoken_qa(model, processor, records, batch_size=4)
    said = [normalize_text(item["text"]).split() for item in first["items"]]
    assert all(said) and len(set(said[0])) > 1
    for record, words in zip(records[:3], said):
        record["answers"] = [words[0]]
    records[3]["answers"] = ["paris"]  # s2s right for q3 only: the ASR below hears "paris"
    other = next(word for word in said[0] if word != said[0][0])
    records[0]["probe"], records[1]["probe"] = other, "zqzq"  # q0's name is in its answer, q1's is not
    # the text LLM is right on q0 and q3 only, and names q1's probe
    text_llm = _FixedLLM({questions[0]: said[0][0], questions[1]: "zqzq", questions[2]: "no", questions[3]: "paris"})
    result = evaluate_spoken_qa(model, processor, records, _Transcriber("i think it is paris"), text_llm,
                                batch_size=4, question_transcriber=_Transcriber("capital of spain"))
    assert [item["text"] for item in result["items"]] == [item["text"] for item in first["items"]]

    assert result["s2t_accuracy"] == pytest.approx(3 / 4) and result["s2s_accuracy"] == pytest.approx(1 / 4)
    assert result["text_llm_accuracy"] == pytest.approx(2 / 4) and result["text_llm_right"] == 2
    # retention counts only q0 and q3, the questions the text LLM answers right
    assert result["s2t_retention"] == pytest.approx(1 / 2) and result["s2s_retention"] == pytest.approx(1 / 2)
    assert result["by_kind"]["a"]["s2t_retention"] == 1.0 and result["by_kind"]["a"]["text_llm_right"] == 1
    assert result["by_kind"]["b"]["s2t_retention"] == 0.0 and result["by_kind"]["b"]["s2s_retention"] == 1.0
    assert result["by_voice"]["v"]["s2t_retention"] == pytest.approx(1 / 2)
    # hearing: only the two probe questions; s2t names q0's, the ASR transcript names neither, the text LLM q1's
    assert result["probes"] == 2 and result["by_kind"]["a"]["probes"] == 2 and "probes" not in result["by_kind"]["b"]
    assert result["s2t_hearing"] == pytest.approx(1 / 2) and result["s2s_hearing"] == 0.0
    assert result["text_llm_hearing"] == pytest.approx(1 / 2)
    # dictation: the adapter's CTC transcript of each question clip, scored against the question text
    features = processor(audio=[r["audio"] for r in records], return_tensors="pt")["input_features"]
    dictations = adapter_dictation(model, processor.tokenizer, features)
    assert [item["dictation"] for item in result["items"]] == dictations
    assert result["dictation_wer"] == pytest.approx(word_error_rate(questions, dictations))
    assert result["by_kind"]["b"]["dictation_wer"] == pytest.approx(word_error_rate(questions[2:], dictations[2:]))
    # the ASR on the same clips: "capital of spain" is 1 error in 3 words for q0 and q2, 3 in 2 + 2 for q1 and q3
    assert result["question_asr_wer"] == pytest.approx((1 + 3 + 1 + 3) / 10)


def test_retention_without_text_llm_and_hearing_without_probes(tmp_path, tiny):
    model, processor = tiny
    records = [{"id": "q", "audio": _clip(tmp_path, "q.wav", 0.6, 0), "answers": ["x"], "question": "what is it"}]
    result = evaluate_spoken_qa(model, processor, records)
    assert "s2t_retention" not in result and "probes" not in result and "question_asr_wer" not in result
    assert result["dictation_wer"] is not None


def test_adapter_dictation_collapses_runs_and_drops_blanks(tiny, monkeypatch):
    model, processor = tiny
    tokenizer, blank = processor.tokenizer, model.config.audio_token_id
    hello, world = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("hello", " world"))
    frames = [blank, hello, hello, blank, hello, world, world, blank, world, blank]  # hello hello world world
    logits = torch.full((1, len(frames) + 3, model.config.text_config.vocab_size), -1.0)
    logits[0, torch.arange(len(frames)), torch.tensor(frames)] = 1.0
    logits[0, len(frames):, hello] = 1.0  # padding frames after the clip's length are not read

    def fake(input_features, return_ctc_logits):
        assert return_ctc_logits
        return SpeechAdapterOutput(speech_embeddings=[], ctc_logits=logits, ctc_lengths=torch.tensor([len(frames)]))

    monkeypatch.setattr(model, "get_speech_embeddings", fake)
    features = torch.zeros(2, 1, 1)
    expected = tokenizer.decode([hello, hello, world, world])
    assert adapter_dictation(model, tokenizer, features) == [expected.strip()] * 2


def test_manifest_probe_must_be_a_name(tmp_path):
    audio = _clip(tmp_path, "a.wav", 0.5, 0)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "q", "audio": audio, "answers": ["x"], "probe": " "}) + "\n")
    with pytest.raises(ValueError, match="probe"):
        read_eval_manifest(str(path))


def test_cli_prints_the_figures_per_kind_and_voice(monkeypatch, capsys, tmp_path):
    row = {"n": 2, "s2t_accuracy": 0.5, "text_llm_right": 1, "s2t_retention": 1 / 3, "dictation_wer": 0.25}
    result = {**row, "segmentation_mode": "fast", "seconds": 1.0, "by_kind": {"animals": row, "body": row},
              "by_voice": {"flite_awb": row}}
    import modeling_echox.evaluation.spoken_qa as evaluation

    monkeypatch.setattr(evaluation, "run_eval", lambda *args, **kwargs: result)
    args = types.SimpleNamespace(model="m", manifest="x", out=str(tmp_path / "r.json"), asr_model=None,
                                 text_only=True, text_llm="auto", mode=None, batch_size=8, limit=None, seed=0,
                                 int8=False, dictation_beam_size=None, dictation_lm_weight=None,
                                 dictation_length_bonus=None)
    cli._eval(args)
    out = capsys.readouterr().out
    printed = json.loads(out)
    assert printed["s2t_retention"] == pytest.approx(1 / 3) and printed["text_llm_right"] == 1
    assert printed["by_kind"]["body"] == {"n": 2, "s2t_accuracy": 0.5, "text_llm_right": 1, "s2t_retention": 0.333,
                                          "dictation_wer": 0.25}
    assert set(printed["by_voice"]) == {"flite_awb"}
    assert len(out.splitlines()) < 20  # one line per kind and voice


def test_cli_passes_the_dictation_search_to_generate(monkeypatch, tmp_path):
    import modeling_echox.evaluation.spoken_qa as evaluation

    seen = {}
    monkeypatch.setattr(evaluation, "run_eval", lambda *args, **kwargs: seen.update(kwargs) or {"n": 0})
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--manifest", "x", "--out", str(tmp_path / "r.json"),
                              "--dictation-beam-size", "8", "--dictation-lm-weight", "0.3",
                              "--dictation-length-bonus", "2"])
    args.run(args)
    assert seen["generation"] == {"dictation_beam_size": 8, "dictation_lm_weight": 0.3, "dictation_length_bonus": 2.0}
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--manifest", "x", "--out", "y", "--dictation-lm-weight", "-1"])
