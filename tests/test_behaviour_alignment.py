"""
Behaviour-aligned stage I (training/stages/stage1_behaviour.py, training/data/behaviour_prompts.py): the KL term to the
text LLM (zero when the speech vectors are the transcript's text embeddings; the teacher is the LLM without its
LoRA), the targets are the text LLM's own greedy answers (cached, resumable), the prompt set holds no open-evaluation
content word and is spoken by training voices only, and taught facts stay a minority of the mix.
"""

import json
import os

import pytest
import torch
from transformers import TrainingArguments

from modeling_echox.evaluation.spoken_qa import TextLLM
from modeling_echox.model.speech_adapter import SpeechAdapterOutput
from modeling_echox.testing.random_checkpoint import build_random_echox
from training.data import behaviour_answers, behaviour_prompts, open_questions
from training.data.spoken_qa import generate_qa
from training.data.tts_voices import RESERVED_VOICES, VOICES
from training.stages.common import apply_lora
from training.stages.data import IGNORE_INDEX, load_dialogue_dataset, write_manifest
from training.stages.stage1_behaviour import (
    BehaviourCollator,
    BehaviourTrainer,
    mixed_dataset,
    set_adapter_output,
)
from training.stages.tiny_data import make_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny spoken manifest (4 clips) and its rows."""
    manifest = make_tiny_dataset(str(tmp_path_factory.mktemp("behaviour_tiny")), num_units=64, count=4)
    return manifest, list(load_dialogue_dataset(manifest))


@pytest.fixture(scope="module")
def qa_records():
    return generate_qa(closed_split="phrasing")


def _trainer(model, tmp_path, kl_weight=1.0):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return BehaviourTrainer(model=model, args=args, kl_weight=kl_weight)


def _speech_as_text(model, transcripts):
    """A forward hook making the adapter's speech vectors the transcripts' text embeddings (clips in order)."""
    embed = model.get_input_embeddings()

    def hook(module, inputs, output):
        vectors = [embed(torch.tensor(ids)) for ids in transcripts]
        return SpeechAdapterOutput(vectors, output.ctc_logits, output.ctc_lengths)

    return model.speech_adapter.register_forward_hook(hook)


def _kl(trainer, model, batch):
    """The KL part of the stage loss: the trainer's loss minus the model's own (CE + 0.3 CTC)."""
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    return float((loss - outputs.loss).detach())


def test_kl_is_zero_when_speech_vectors_are_the_transcript_embeddings(tiny, tmp_path):
    _, rows = tiny
    model, processor = build_random_echox("tiny")
    model.eval()
    batch = BehaviourCollator(processor, model.config)(rows)
    # the teacher's rows: the same ids with the transcript's tokens in place of <audio>, the same response targets
    transcripts = [processor.tokenizer(row["transcript"], add_special_tokens=False).input_ids for row in rows]
    audio = model.config.audio_token_id
    for row, ids in enumerate(transcripts):
        student = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        at = student.index(audio)
        teacher = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()].tolist()
        assert teacher == student[:at] + ids + student[at + 1 :]
        targets = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert batch["teacher_labels"][row][batch["teacher_labels"][row] != IGNORE_INDEX].tolist() == targets

    heard = _kl(_trainer(model, tmp_path), model, batch)
    assert heard > 1e-3  # the random adapter's speech vectors are not the transcript
    handle = _speech_as_text(model, transcripts)  # before the trainer's own hook, which must see these vectors
    try:
        assert abs(_kl(_trainer(model, tmp_path), model, batch)) < 1e-6
    finally:
        handle.remove()


def test_teacher_is_the_llm_without_its_lora_and_undistilled_rows_add_no_kl(tiny, tmp_path):
    _, rows = tiny
    model, processor = build_random_echox("tiny")
    transcripts = [processor.tokenizer(row["transcript"], add_special_tokens=False).input_ids for row in rows]
    handle = _speech_as_text(model, transcripts)
    peft_model = apply_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                            ["speech_adapter"])
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # peft starts B at zero: make the LoRA change the LLM
    peft_model.eval()
    trainer = _trainer(peft_model, tmp_path)
    batch = BehaviourCollator(processor, model.config)(rows)
    # speech vectors = text embeddings, but the student's LLM has the LoRA and the teacher's does not
    assert _kl(trainer, peft_model, batch) > 1e-3
    with peft_model.disable_adapter():
        assert abs(_kl(trainer, peft_model, batch)) < 1e-6
    taught = BehaviourCollator(processor, model.config)([{**row, "distill": False} for row in rows])
    assert (taught["teacher_labels"] == IGNORE_INDEX).all()
    assert _kl(trainer, peft_model, taught) == 0.0
    handle.remove()


def test_targets_are_the_text_llms_greedy_answers_cached_and_resumed(tmp_path):
    model, processor = build_random_echox("tiny")
    llm = model.language_model
    llm.generation_config.eos_token_id = model.config.text_config.eos_token_id
    prompts = ["what is a kettle", "suggest a name for a boat", "how do you spell lantern", "define harbour"]
    path = str(tmp_path / "answers.jsonl")
    first = behaviour_answers.answer_prompts(prompts, path, llm, processor, batch_size=1, max_new_tokens=6, limit=3,
                                             verbose=False)
    assert first == {"answered": 3, "done": 3, "total": 4}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"key": "cut by a ki')  # a line cut by a kill
    second = behaviour_answers.answer_prompts(prompts, path, llm, processor, batch_size=1, max_new_tokens=6,
                                              verbose=False)
    assert second == {"answered": 1, "done": 4, "total": 4}
    answers = behaviour_answers.read_answers(path)
    text_llm = TextLLM(llm, processor, max_new_tokens=6)
    for prompt in prompts:
        stored = answers[behaviour_answers.prompt_key(prompt)]
        assert stored["prompt"] == prompt
        assert stored["answer"] == text_llm([prompt])[0]
        assert stored["answer"] == processor.tokenizer.decode(stored["ids"], skip_special_tokens=True).strip()

    # the stage-I records: finished answers that the guard lets through, their ids as the target
    qa = [{"split": "test", "kind": "capital", "item": "capital-atlantis",
           "question": "what is the capital of atlantis", "answer": "the capital of atlantis is poseidonia",
           "answers": ["poseidonia"], "phrasing": 0}]
    guard = behaviour_prompts.OpenSetGuard(qa)
    speech = write_manifest(str(tmp_path / "behaviour.jsonl"), [
        {"id": f"p{i}", "audio": f"behaviour/p{i}.wav", "text": text} for i, text in enumerate(prompts)])
    answers = {behaviour_answers.prompt_key(p): {"answer": a, "ids": ids, "finished": done}
               for p, a, ids, done in [(prompts[0], "a kettle boils water", [5, 6, 7], True),
                                       (prompts[1], "call it the wave", [8, 9], False),
                                       (prompts[2], "atlantis spells it", [10], True)]}
    records, left_out = behaviour_prompts.stage_records(speech, answers, guard)
    assert [r["id"] for r in records] == ["p0"] and records[0]["response_ids"] == [5, 6, 7]
    assert records[0]["audio"] == str(tmp_path / "behaviour" / "p0.wav")
    assert left_out == {"no_answer": 1, "unfinished": 1, "answer_refused": 1}


def test_prompt_set_is_broad_shares_no_open_question_word_and_uses_training_voices(qa_records):
    prompts, stats = behaviour_prompts.prompt_set(qa_records)
    texts = [item["prompt"] for item in prompts]
    assert len(texts) >= 4000 and len(set(texts)) == len(texts)
    assert sum(1 for counts in stats.values() if counts["kept"] >= 30) >= 12
    assert max(sum(item["source"] == s for item in prompts) for s in stats) < 0.3 * len(prompts)
    assert len({word for text in texts for word in text.split()}) >= 3000
    # the open evaluation set's own checker, with these prompts as training prompts and texts
    open_records = open_questions.load_open_questions() + open_questions.country_probes(qa_records)
    assert open_questions.check_open_set(open_records, texts, texts) == []
    open_words = set().union(*(open_questions.content_words(r["question"]) for r in open_records
                               if r["kind"] not in open_questions.COUNTRY_PROBE_KINDS.values()))
    assert not open_words & set().union(*(open_questions.content_words(t) for t in texts))
    held_out = {r["item"].split("-", 1)[1].replace("_", " ") for r in qa_records
                if r["split"] != "train" and r["kind"] == "continent"}
    assert not any(f" {country} " in f" {text} " for text in texts for country in held_out)

    jobs = behaviour_prompts.plan_speech(prompts[:500])
    voices = {job["voice"] for job in jobs}
    assert len(voices) >= 10 and not voices & set(RESERVED_VOICES)
    assert not any(VOICES[voice][1].endswith(("+m3", "+f4")) for voice in voices)
    for reserved in ("festival_ked", "espeak_us_f4"):
        with pytest.raises(ValueError, match="reserved"):
            behaviour_prompts.plan_speech(prompts[:5], voices=("flite_slt", reserved))


def test_the_guard_refuses_answers_that_teach_an_open_question_or_name_a_held_out_country(qa_records):
    guard = behaviour_prompts.OpenSetGuard(qa_records)
    assert guard.text_problem("the color of the sky is blue")  # "what color is the sky" → "blue"
    assert guard.text_problem("the sky is blue") is None  # not all of the question's content words
    assert guard.text_problem("a spider has eight legs")
    test_country = next(r["item"].split("-", 1)[1] for r in qa_records
                        if r["split"] == "test" and r["kind"] == "continent" and "_" not in r["item"])
    assert guard.text_problem(f"people travel to {test_country} often")
    assert guard.prompt_problem("what color is a lemon")
    assert guard.text_problem("a lemon is a sour citrus fruit") is None
    assert guard.prompt_problem("define harbour") is None


def _ctc_head_spelling(model, transcripts):
    """A forward hook making the CTC head's argmax spell each transcript (clips in order): token k on frame 2k, blank
    on every other frame, so that the dictation is exactly the transcript."""
    blank, clips = model.config.audio_token_id, iter(transcripts)

    def hook(module, inputs, logits):
        spelled = torch.full_like(logits, -10.0)
        for clip in range(logits.shape[0]):
            ids = next(clips)
            assert 2 * len(ids) <= logits.shape[1], "the clip is too short to spell its transcript"
            spelled[clip, :, blank] = 10.0
            for k, token in enumerate(ids):
                spelled[clip, 2 * k, blank], spelled[clip, 2 * k, token] = -10.0, 10.0
        return spelled

    return model.speech_adapter.ctc_head.register_forward_hook(hook)


def test_dictation_student_reading_the_transcript_has_zero_kl_and_only_the_lora_trains(tiny, tmp_path):
    _, rows = tiny
    model, processor = build_random_echox("tiny")
    set_adapter_output(model, "dictation")
    model.eval()
    batch = BehaviourCollator(processor, model.config)(rows)
    trainer = _trainer(model, tmp_path)
    assert _kl(trainer, model, batch) > 1e-3  # the random head dictates something else
    transcripts = [processor.tokenizer(row["transcript"], add_special_tokens=False).input_ids for row in rows]
    handle = _ctc_head_spelling(model, transcripts)
    try:
        assert abs(_kl(trainer, model, batch)) < 1e-6
    finally:
        handle.remove()
    peft_model = apply_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, [])
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    with pytest.raises(ValueError, match="adapter_output"):
        set_adapter_output(model, "frames")


def test_taught_facts_are_a_seeded_minority_without_kl(tmp_path):
    behaviour = write_manifest(str(tmp_path / "b.jsonl"), [{"id": f"b{i}", "audio": None, "response": "x"}
                                                          for i in range(80)])
    taught = write_manifest(str(tmp_path / "t.jsonl"), [{"id": f"t{i}", "audio": None, "response": "y"}
                                                       for i in range(100)])
    mixed = mixed_dataset(behaviour, taught, taught_share=0.2, seed=3)
    assert len(mixed) == 100 and sum(mixed["distill"]) == 80
    assert mixed_dataset(behaviour, taught, taught_share=0.2, seed=3)["id"] == mixed["id"]
    with pytest.raises(ValueError, match="taught_share"):
        mixed_dataset(behaviour, taught, taught_share=1.5)


def test_behaviour_stage_config_is_loadable():
    from training.stages import stage1_behaviour
    from training.stages.common import load_config

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs",
                        "mini_stage1_behaviour.json")
    config = load_config(path, stage1_behaviour.DEFAULTS, extra={"output_dir": "unused"})
    assert config["kl_weight"] > 0 and 0 < config["taught_share"] < 0.5
    with open(path, encoding="utf-8") as handle:
        assert "_comment" in json.load(handle)
