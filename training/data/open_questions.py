"""
EchoX-mini's open evaluation set: everyday questions that no training prompt holds, spoken by voices reserved for
evaluation, plus hearing probes about names that no training text holds. `echox eval --manifest` reads its manifest.

Questions:
- `open_questions.json` (hand-written, next to this file): `{kind: [{"question", "answers": [gold strings],
  "probe"?}]}`, ten or more questions for each of 35 everyday topics (animals, body, colours, food, weather, ...),
  every gold answer in its accepted forms ("autumn", "fall"; "vet", "veterinarian"), none in its own question.
  `probe` names the thing a question asks about ("who wrote romeo and juliet": "romeo and juliet") where it asks
  about a name.
- `small_talk` ("hello how are you", "thank you", "do you know a good joke", ...) is scored by the KIND of answer:
  its gold strings are the words an answer of the right kind holds (a greeting returned, thanks acknowledged, a
  self-introduction, a joke's "why"/"because"), so the text LLM's own replies score right and a training template
  ("zero plus two is two") scores wrong. `echox eval`'s result keeps every answer for the side-by-side table.
- hearing probes, `probe` = the name: `probe_person`, `probe_place`, `probe_animal` (hand-written: "who was
  hatshepsut", "where is timbuktu", "what is a capybara": names outside the listening corpus' vocabulary), and `probe_capital` / `probe_continent`: the spoken QA's
  test-split countries (held out of every training step by `training.data.spoken_qa`), one seeded phrasing per
  question. These two keep the training phrasings on purpose: only the country is new.

What no training data may hold (`check_open_set`). Content words are the normalized words that are not in
`STOP_WORDS`, plurals folded ("legs" = "leg"):
1. an open question shares no content word with any training PROMPT (the questions of qa.jsonl's train split, and
   the prompts or transcripts of `--prompts` manifests);
2. no other training TEXT (read sentences such as the listening and general sentences, training answers) holds all
   content words of an open question together with one of its gold answers, i.e. the fact is never read aloud
   (small talk has no fact to teach and is not checked);
3. a probe's name has a word that no training text holds.
A question that breaks rule 1 or 2, and a probe kind's question whose name breaks rule 3, is left out of the set; an
everyday question whose name breaks rule 3 stays, without its `probe`. `<out>/refused.jsonl` lists every problem; the
build stops when fewer than `MIN_EVERYDAY` everyday questions over `MIN_KINDS` topics remain.
Read sentences get rule 2 rather than rule 1 because they exist to teach hearing of everyday words: the
recipe's 2000 general sentences alone share a content word with 341 of the 432 hand-written questions, the listening
corpus (`training.data.listening`) with 393. Rule 1 against them would leave almost no everyday question.

    python -m training.data.open_questions --out build/data/open_eval [--qa build/data/qa.jsonl]
        [--texts build/data/speech/general.jsonl ...] [--prompts MANIFEST ...] [--voices festival_ked,...]

Writes `<out>/open_eval.jsonl`, one line per (question, voice), audio paths relative to `<out>`, and
`<out>/refused.jsonl` (`{"id", "rule", "problem"}`):

    {"id", "audio", "answers", "question", "kind", "voice", "probe"?, "duration"}
"""

import argparse
import json
import os
import random

from .spoken_qa import country_of, generate_qa, normalize_text, read_jsonl
from .synthesize import _chunks, run_synthesis
from .tts_voices import RESERVED_VOICES, VOICES, voice_available

QUESTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_questions.json")
SMALL_TALK = "small_talk"
COUNTRY_PROBE_KINDS = {"capital": "probe_capital", "continent": "probe_continent"}
PROBE_KINDS = ("probe_person", "probe_place", "probe_animal", *COUNTRY_PROBE_KINDS.values())
# The least the set may hold once refused questions are left out: 300 questions over 30 topics.
MIN_EVERYDAY, MIN_KINDS = 300, 30
# Function words only: a word that carries what a question is about (a noun, verb, adjective, number) is a content word.
STOP_WORDS = frozenset("""
    a an the this that these those some any each every all both no not
    i me my mine you your yours we us our he him his she her it its they them their there
    what which who whom whose where when why how
    is are was were be been being am do does did done have has had
    can could will would shall should might must
    of in on at to for from by with about into onto over under through between among around across
    and or but if so than then as too very also only
    many more most much few
""".split())
# Fields of a training manifest line that hold text the model was trained on.
PROMPT_FIELDS = ("question", "prompt", "transcript")
TEXT_FIELDS = ("question", "prompt", "transcript", "text", "answer_text", "response", "answer")


def fold(word: str) -> str:
    """A word with its plural ending folded ("legs" → "leg", "boxes" → "box", "berries" → "berry")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """The normalized, plural-folded words of `text`."""
    return [fold(word) for word in normalize_text(text).split()]


def content_words(text: str) -> set[str]:
    """The words of `text` that are not `STOP_WORDS`, plural-folded."""
    return {fold(word) for word in normalize_text(text).split() if word not in STOP_WORDS}


def load_open_questions(path: str = QUESTIONS_FILE) -> list[dict]:
    """The hand-written questions as records `{"id", "kind", "question", "answers", "probe"?}` (validated)."""
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    records, seen = [], set()
    for kind, items in table.items():
        for index, item in enumerate(items):
            where = f"{path}: {kind}[{index}]"
            question, answers = item.get("question"), item.get("answers")
            if not isinstance(question, str) or not content_words(question):
                raise ValueError(f"{where}: 'question' must be a string with a content word, got {question!r}.")
            if not answers or not all(isinstance(a, str) and normalize_text(a) for a in answers):
                raise ValueError(f"{where}: 'answers' must be a non-empty list of non-empty strings.")
            echoed = [answer for answer in answers if _run_in(normalize_text(answer), normalize_text(question))]
            if echoed and kind != SMALL_TALK:
                raise ValueError(f"{where}: the gold answer(s) {echoed} are in the question itself.")
            if "probe" in item and not (isinstance(item["probe"], str) and normalize_text(item["probe"])):
                raise ValueError(f"{where}: 'probe' must be a non-empty string.")
            if normalize_text(question) in seen:
                raise ValueError(f"{where}: the question {question!r} is there twice.")
            seen.add(normalize_text(question))
            records.append({"id": f"{kind}-{index:02d}", "kind": kind, "question": question, "answers": list(answers),
                            **({"probe": item["probe"]} if "probe" in item else {})})
    return records


def _run_in(phrase: str, text: str) -> bool:
    """Whether the words of `phrase` occur as a run of whole words in `text`."""
    return f" {phrase} " in f" {text} "


def country_probes(qa_records: list[dict], seed: int = 0) -> list[dict]:
    """One seeded phrasing of every test-split capital and continent question, `probe` = the country."""
    rng = random.Random(f"open-probes-{seed}")
    by_item: dict = {}
    for record in qa_records:
        if record["split"] == "test" and record["kind"] in COUNTRY_PROBE_KINDS:
            by_item.setdefault(record["item"], []).append(record)
    probes = []
    for item, phrasings in sorted(by_item.items()):
        record = rng.choice(sorted(phrasings, key=lambda r: r["phrasing"]))
        kind = COUNTRY_PROBE_KINDS[record["kind"]]
        probes.append({"id": f"{kind}-{item.split('-', 1)[1]}", "kind": kind, "question": record["question"],
                       "answers": list(record["answers"]), "probe": country_of(record)})
    return probes


def training_texts(qa_records: list[dict], manifests=(), prompt_manifests=()) -> tuple[list[str], list[str]]:
    """
    (training prompts, every training text): the questions of the qa train split and the `PROMPT_FIELDS` of
    `prompt_manifests` are prompts; those, the train answers and every `TEXT_FIELDS` text of `manifests` are texts.
    """
    prompts, texts = [], []
    for record in qa_records:
        if record["split"] == "train":
            prompts.append(record["question"])
            texts += [record["answer"], *record["answers"]]
    for path in prompt_manifests:
        for line in read_jsonl(path):
            prompts += [line[field] for field in PROMPT_FIELDS if isinstance(line.get(field), str)]
    texts += prompts
    for path in manifests:
        for line in read_jsonl(path):
            texts += [line[field] for field in TEXT_FIELDS if isinstance(line.get(field), str)]
    return prompts, texts


def check_open_set(records: list[dict], prompts: list[str], texts: list[str]) -> list[dict]:
    """
    Every broken rule of the module docstring, as `{"id", "rule": 1 | 2 | 3, "problem"}` (empty: the set is clean).
    Country probes (`probe_capital`, `probe_continent`) keep training phrasings and are checked by rule 3 only.
    """
    prompt_words = set().union(*(content_words(prompt) for prompt in prompts))
    holding: dict[str, set[int]] = {}  # word → the texts holding it
    for index, text in enumerate(texts):
        for word in words(text):
            holding.setdefault(word, set()).add(index)

    def holding_all(phrase_words) -> set[int]:
        found = [holding.get(word, set()) for word in phrase_words]
        return set.intersection(*found) if found else set()

    problems = []
    for record in records:
        question, kind = record["question"], record["kind"]
        if kind not in COUNTRY_PROBE_KINDS.values():
            shared = content_words(question) & prompt_words
            if shared:
                problems.append({"id": record["id"], "rule": 1,
                                 "problem": f"{question!r} shares {sorted(shared)} with training prompts"})
            if kind != SMALL_TALK:
                with_question = holding_all(content_words(question))
                for answer in record["answers"]:
                    teaching = sorted(with_question & holding_all(words(answer)))
                    if teaching:
                        problems.append({"id": record["id"], "rule": 2, "problem": f"{question!r} is answered by "
                                         f"the training text {texts[teaching[0]]!r}"})
                        break
        probe = record.get("probe")
        if probe and all(word in holding for word in words(probe)):
            problems.append({"id": record["id"], "rule": 3,
                             "problem": f"every word of the probe {probe!r} is in training texts"})
    return problems


def open_set(qa_records: list[dict], manifests=(), prompt_manifests=(), seed: int = 0,
             questions_file: str = QUESTIONS_FILE) -> tuple[list[dict], list[dict]]:
    """
    (the open set, the refused questions): the hand-written questions and the country probes, checked against the
    training data (`training_texts`). A question that breaks rule 1 or 2, or a probe kind's question whose name
    breaks rule 3, is refused (left out); an everyday question whose name breaks rule 3 stays, without its `probe`.
    `refused`: `check_open_set`'s problems. `ValueError` when fewer than `MIN_EVERYDAY` everyday questions over
    `MIN_KINDS` kinds remain.
    """
    records = load_open_questions(questions_file) + country_probes(qa_records, seed)
    prompts, texts = training_texts(qa_records, manifests, prompt_manifests)
    refused = check_open_set(records, prompts, texts)
    kind_of = {record["id"]: record["kind"] for record in records}
    dropped = {p["id"] for p in refused if p["rule"] in (1, 2) or kind_of[p["id"]] in PROBE_KINDS}
    unheard = {p["id"] for p in refused if p["rule"] == 3}
    kept = [{key: value for key, value in record.items() if key != "probe" or record["id"] not in unheard}
            for record in records if record["id"] not in dropped]
    everyday = [record for record in kept if record["kind"] not in (SMALL_TALK, *PROBE_KINDS)]
    if len(everyday) < MIN_EVERYDAY or len({record["kind"] for record in everyday}) < MIN_KINDS:
        raise ValueError(f"Only {len(everyday)} everyday questions over {len({r['kind'] for r in everyday})} kinds "
                         f"pass the checks (at least {MIN_EVERYDAY} over {MIN_KINDS} are needed):\n  "
                         + "\n  ".join(f"{p['id']} (rule {p['rule']}): {p['problem']}" for p in refused))
    return kept, refused


def synthesize_open_set(records: list[dict], out_dir: str, voices=RESERVED_VOICES, workers: int = 2) -> str:
    """Speak every record in every voice (clean, existing clips kept) and write `<out_dir>/open_eval.jsonl`."""
    unknown = [voice for voice in voices if voice not in VOICES]
    if unknown:
        raise ValueError(f"Unknown voices {unknown}; choose from {sorted(VOICES)}.")
    not_reserved = [voice for voice in voices if voice not in RESERVED_VOICES]
    if not_reserved:
        raise ValueError(f"Voices {not_reserved} are training voices; only {RESERVED_VOICES} speak the open set.")
    missing = [voice for voice in voices if not voice_available(voice)]
    if missing:
        raise RuntimeError(f"TTS voices not available: {missing} (see training/data/tts_voices.py for the packages).")
    items = {voice: [(os.path.join(voice, f"{r['id']}.wav"), r["question"], None) for r in records] for voice in voices}
    durations, _ = run_synthesis(list(_chunks(items, 48, out_dir)), workers)
    path = os.path.join(out_dir, "open_eval.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for voice in voices:
            for record in records:
                audio = os.path.join(voice, f"{record['id']}.wav")
                line = {"id": f"{record['id']}-{voice}", "audio": audio, "answers": record["answers"],
                        "question": record["question"], "kind": record["kind"], "voice": voice,
                        **({"probe": record["probe"]} if "probe" in record else {}),
                        "duration": round(durations[audio], 3)}
                handle.write(json.dumps(line) + "\n")
    return path


def write_open_eval(out: str, qa: str | None = None, texts=(), prompts=(), voices=RESERVED_VOICES,
                    workers: int = min(2, os.cpu_count() or 1), seed: int = 0) -> str:
    """
    The open evaluation set in `out`: its questions checked against the training `texts` and `prompts` manifests
    (refused ones listed in `refused.jsonl`), spoken in `voices` (`open_eval.jsonl`); returns the manifest's path.
    `qa`: the recipe's qa.jsonl (default: generated as the recipe does).
    """
    qa_records = read_jsonl(qa) if qa else generate_qa(closed_split="phrasing")
    records, refused = open_set(qa_records, list(texts), list(prompts), seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "refused.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(problem) + "\n" for problem in refused)
    for problem in refused:
        print(f"refused {problem['id']} (rule {problem['rule']}): {problem['problem']}")
    voices = tuple(voices)
    path = synthesize_open_set(records, out, voices, workers)
    kinds = sorted({record["kind"] for record in records})
    print(f"{len(records)} questions over {len(kinds)} kinds × {len(voices)} voices → {path} "
          f"({len(refused)} problems: {out}/refused.jsonl)")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (wav files + open_eval.jsonl)")
    parser.add_argument("--qa", default=None, help="the recipe's qa.jsonl (default: generated as the recipe does)")
    parser.add_argument("--texts", nargs="*", default=[], help="training manifests whose texts the set must not teach "
                        "(read sentences, answers: rules 2 and 3)")
    parser.add_argument("--prompts", nargs="*", default=[], help="training manifests of questions/requests the model "
                        "learns to answer (rule 1)")
    parser.add_argument("--voices", default=",".join(RESERVED_VOICES), help="comma-separated reserved voices")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_open_eval(args.out, args.qa, args.texts, args.prompts, tuple(voice for voice in args.voices.split(",") if voice),
                    args.workers, args.seed)


if __name__ == "__main__":
    main()
