"""
The manifests EchoX-mini's recipe (`training.echox_mini`) builds between its steps: stage-I, stage-II and stage-III
manifests from the synthesized speech and stage 0's units, the `echox eval` manifest, the vocoder's held-out units, and
the behaviour-aligned stage I's answers and manifest.
"""

import json
import os
import random


def stage_manifests(speech_dir: str, out_dir: str) -> dict[str, str]:
    """The synthesized manifests → stage-I manifests (`audio`, `transcript`, `response`), absolute paths."""
    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split in ("train", "dev", "test"):
        source = os.path.join(speech_dir, f"{split}.jsonl")
        if not os.path.isfile(source):
            continue
        records = [
            {"id": r["id"], "audio": os.path.join(os.path.abspath(speech_dir), r["audio"]), "transcript": r["question"],
             "response": r["answer_text"], "answer_audio": os.path.join(os.path.abspath(speech_dir), r["answer_audio"]),
             "answer_text": r["answer_text"]}
            for r in read_jsonl(source)
        ]
        paths[split] = write_manifest(os.path.join(out_dir, f"s2t_{split}.jsonl"), records)
    return paths


def t2c_manifest(units_dir: str, out_path: str) -> str:
    """
    Stage II's manifest: every answer-voice clip of stage 0 once (spoken answers, read sentences, fragments and the
    general sentences), `{"id", "response", "units"}` with the units in the unit language. The general sentences'
    many words keep the echo decoder reading the text rather than recalling the few hundred training answers.
    """
    from modeling_echox.units.unit_language import EchoXUnitLanguage

    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest

    language = EchoXUnitLanguage.from_pretrained(os.path.join(units_dir, "unit_language"))
    records = [
        {"id": f"t2c-{index}", "response": item["text"], "units": language.encode(item["units"])}
        for index, item in enumerate(read_jsonl(os.path.join(units_dir, "vocoder_units.jsonl")))
        if item["text"] and item["units"]
    ]
    return write_manifest(out_path, records)


def read_aloud_manifest(t2c_path: str, speech_dir: str, out_path: str) -> str:
    """Stage III's read-aloud items: the general sentences of stage II's manifest (`{"id", "response", "units"}`)."""
    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest

    general = {record["answer_text"] for record in read_jsonl(os.path.join(speech_dir, "general.jsonl"))}
    return write_manifest(out_path, [item for item in read_jsonl(t2c_path) if item["response"] in general])


def eval_manifest(speech_dir: str, split: str = "test", seed: int = 0) -> str:
    """
    `<speech_dir>/eval_<split>.jsonl` for `echox eval`: every held-out voice, one seeded phrasing per capital,
    continent and arithmetic item, every phrasing of the (few) day and month items that the split holds (one per
    item under the phrasing split of `training.data.spoken_qa`).
    """
    from .data.spoken_qa import read_jsonl

    rng = random.Random(f"eval-{seed}")
    records = read_jsonl(os.path.join(speech_dir, f"{split}.jsonl"))
    phrasings: dict = {}
    for record in records:
        phrasings.setdefault(record["item"], set()).add(record["id"].rsplit("-", 1)[0])
    chosen = {item: rng.choice(sorted(ids)) for item, ids in sorted(phrasings.items())}
    path = os.path.join(speech_dir, f"eval_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            question_id = record["id"].rsplit("-", 1)[0]
            if record["kind"] in ("day", "month") or chosen[record["item"]] == question_id:
                line = {key: record[key] for key in ("id", "audio", "answers", "question", "kind", "voice")}
                handle.write(json.dumps(line) + "\n")
    return path


def held_out_units(units_dir: str, speech_dir: str, out_path: str, encoder_config: dict, limit: int = 30) -> str:
    """
    Units of held-out answers (test split, never trained on) in the vocoder manifest format, for the WER check;
    `encoder_config`: stage 0's `encoder` entry (the speech encoder of the units in `units_dir`).
    """
    from modeling_echox.model.audio_io import load_audio
    from modeling_echox.units.extractor import EchoXUnitExtractor

    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest
    from .stages.stage0_units import load_encoder

    encoder, feature_extractor = load_encoder(encoder_config)
    extractor = EchoXUnitExtractor.from_pretrained(units_dir, encoder, feature_extractor=feature_extractor)
    answers = sorted({(r["answer_audio"], r["answer_text"]) for r in read_jsonl(os.path.join(speech_dir, "test.jsonl"))})
    items = []
    for audio, text in answers[:limit]:
        path = os.path.join(os.path.abspath(speech_dir), audio)
        units, durations = extractor(load_audio(path))
        items.append({"audio": path, "text": text, "units": units.tolist(), "durations": durations.tolist()})
    return write_manifest(out_path, items)


def answer_all_prompts(behaviour_dir: str) -> dict:
    """The text LLM's answers to every behaviour prompt (resuming), then `answers_done.json` with their counts."""
    from .data import behaviour_prompts
    from .data.spoken_qa import read_jsonl

    prompts = [item["prompt"] for item in read_jsonl(os.path.join(behaviour_dir, "prompts.jsonl"))]
    behaviour_prompts.answer_prompts(prompts, os.path.join(behaviour_dir, "answers.jsonl"))
    answers = behaviour_prompts.read_answers(os.path.join(behaviour_dir, "answers.jsonl"))
    done = [answers[behaviour_prompts.prompt_key(prompt)] for prompt in prompts]
    summary = {"prompts": len(done), "finished": sum(a["finished"] for a in done),
               "mean_tokens": round(sum(len(a["ids"]) for a in done) / max(1, len(done)), 1)}
    with open(os.path.join(behaviour_dir, "answers_done.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def behaviour_manifest(qa: str, behaviour_dir: str, speech_dir: str, out_path: str) -> str:
    """Stage I's behaviour manifest: the spoken prompts with their finished answers that the open-set guard passes."""
    from .data import behaviour_prompts
    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest

    guard = behaviour_prompts.OpenSetGuard(read_jsonl(qa))
    records, left_out = behaviour_prompts.stage_records(
        os.path.join(speech_dir, "behaviour.jsonl"),
        behaviour_prompts.read_answers(os.path.join(behaviour_dir, "answers.jsonl")), guard)
    print(f"[echox-mini] behaviour manifest: {len(records)} examples, left out {left_out}", flush=True)
    return write_manifest(out_path, records)
