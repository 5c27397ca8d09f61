"""
The prompt set of EchoX-mini's behaviour-aligned stage I (`training.stages.stage1_behaviour`): thousands of spoken
questions and requests over many topics, each answered by the text LLM itself (BLSP, DeSTA2: the model given the
speech learns to behave as the text LLM given the transcript; arXiv 2309.00916, 2409.20007).

Prompts (`prompt_set`) come from templates over word lists and structured data that install offline: faker's English
nouns, verbs, adjectives, jobs, first names, US states and currencies; `wordfreq`'s vocabulary
(`listening_text.vocabulary`); `countryinfo` through the spoken QA's TRAIN-split countries and capitals; numbers
spelled by `num2words`; hand-written lists of animals, foods and pastimes, everyday requests and small talk. Every
prompt is a lowercase ASCII transcript (`spoken_qa.normalize_text`). The taught facts (days, months, sums, capitals
of `training.data.spoken_qa`) are not in this set: stage I mixes them in as a minority from their own manifest.

What the prompts must not hold (`OpenSetGuard`, built on `training.data.open_questions`; a prompt or answer that
breaks a rule is dropped, never the open set's question):
1. no prompt shares a content word (`open_questions.content_words`) with an open evaluation question;
2. no answer holds all content words of an open question together with one of its gold answers (the fact is never
   taught);
3. no prompt or answer holds a word of a held-out country or capital (`reading.held_out_words`), nor the key word of a
   hearing probe (its rarest word that the spoken QA's training texts do not already hold).
Prompts are spoken by training voices only (`listening.LISTENING_VOICES`; `listening.check_training_voices` refuses
the reserved evaluation voices festival ked, flite awb, espeak-ng en-us+m3 and en-us+f4).

Targets (`training.data.behaviour_answers`): the text LLM's own greedy answer to the transcript — SmolLM2-135M-Instruct with
EchoX-mini's system prompt, `EchoXProcessor.build_prompt_ids(prompt, has_audio=False)` exactly as `echox eval`'s
text-only baseline asks it, at most `MAX_ANSWER_TOKENS` new tokens — stored as its token ids (the stage-I target is
exactly what the LLM generated). Answers that do not end within the budget are kept but marked unfinished, and stage I
leaves them out. Generation appends to `answers.jsonl` after every batch, keyed by the prompt: a killed run resumes.

    python -m training.data.behaviour_prompts prompts --qa build/data/qa.jsonl --out build/data/behaviour
    python -m training.data.behaviour_prompts answers --out build/data/behaviour [--batch-size 16] [--limit N]
    python -m training.data.behaviour_prompts speech --out build/data/behaviour --speech build/data/speech [--workers 2]
    python -m training.data.behaviour_prompts manifest --qa build/data/qa.jsonl --out build/data/behaviour \
        --speech build/data/speech --manifest build/data/stages/s2t_behaviour.jsonl

Files: `<out>/prompts.jsonl` `{"id", "prompt", "source"}`, `<out>/answers.jsonl` `{"key", "prompt", "answer", "ids",
"finished"}`, `<speech>/behaviour.jsonl` `{"id", "audio", "text", "voice", "source", "augment", "duration"}` (audio
relative to `<speech>`; wav files spoken in resumable chunks recorded under `<speech>/behaviour/chunks/`).
"""

import argparse
import hashlib
import json
import os
import random
import re
import time

from . import listening, synthesize, tts_voices
from .behaviour_answers import answer_prompts, prompt_key, read_answers
from .spoken_qa import normalize_text, number_words, read_jsonl

CHUNK_SIZE = 200

# ------------------------------------------------------------------------------------------------- templates
# Each family: (templates, slot). A template holds "{x}" for the slot value. Templates with a word an open question
# holds are dropped by the guard with every prompt made from them, so they are written with other words.
NOUN_TEMPLATES = ("define {x}", "describe {x} in one sentence", "why is {x} important", "tell me a fact about {x}",
                  "what are the benefits of {x}", "how has {x} changed over the years", "summarize the idea of {x}",
                  "what is the history of {x}", "what varieties of {x} exist")
VERB_TEMPLATES = ("what is the past tense of {x}", "why do we {x}", "when should i {x}", "define the verb {x}",
                  "is it healthy to {x} daily", "suggest a reason to {x}")
ADJECTIVE_TEMPLATES = ("what is a synonym for {x}", "what is an antonym of {x}", "name an object that is {x}",
                       "what causes a day to be {x}", "define the adjective {x}")
VOCABULARY_TEMPLATES = ("how do you spell {x}", "what rhymes with {x}", "how many syllables does {x} have",
                        "define {x}", "what is a synonym for {x}", "spell {x} backwards", "is {x} a noun or a verb",
                        "how many vowels are in {x}")
COUNTRY_TEMPLATES = ("what language is spoken in {x}", "what is the population of {x}", "which nations border {x}",
                     "tell me about {x}", "describe the climate of {x}", "what is the national dish of {x}",
                     "what does {x} export", "when did {x} gain independence", "who governs {x}",
                     "which religion is most practised in {x}")
CITY_TEMPLATES = ("tell me about the city of {x}", "describe {x} in one sentence", "what is there to visit in {x}",
                  "how many inhabitants does {x} have", "what is the climate of {x}")
STATE_TEMPLATES = ("what is the capital of {x}", "tell me about {x}", "which region is {x} in",
                   "describe the landscape of {x}", "what is the nickname of {x}", "when did {x} join the union")
CURRENCY_TEMPLATES = ("which nation issues the {x}", "what is the {x}", "tell me about the {x}")
JOB_TEMPLATES = ("what does a {x} do", "what skills does a {x} require", "describe the daily duties of a {x}",
                 "what training does a {x} require", "how much does a {x} earn", "is {x} a stressful job")
NUMBER_TEMPLATES = ("what is {x} squared", "is {x} even or odd", "what is double {x}", "what is {x} divided by two",
                    "what comes after {x}", "what comes before {x}", "what is {x} in roman numerals",
                    "what is ten percent of {x}", "round {x} to the nearest ten", "how do you say {x} in french",
                    "is {x} prime")
NAME_TEMPLATES = ("suggest a nickname for {x}", "what is the origin of the name {x}", "how do you pronounce {x}",
                  "compose a short greeting for {x}", "is {x} a popular name")
ANIMAL_TEMPLATES = ("tell me a fact about the {x}", "what is the habitat of the {x}", "what is the diet of a {x}",
                    "what is the lifespan of a {x}", "is the {x} endangered", "suggest a name for a pet {x}",
                    "describe a {x}")
FOOD_TEMPLATES = ("suggest a recipe with {x}", "is {x} healthy", "what nutrients are in {x}",
                  "which dishes include {x}", "how should {x} be kept fresh", "where does {x} originate")
PASTIME_TEMPLATES = ("how do i start {x}", "what are the benefits of {x}", "what equipment is required for {x}",
                     "is {x} expensive", "how can i improve at {x}", "describe {x} to a beginner")

ANIMALS = ("horse", "rabbit", "fox", "wolf", "lion", "tiger", "goat", "deer", "eagle", "owl", "frog", "snake",
           "turtle", "shark", "dolphin", "penguin", "zebra", "giraffe", "elephant", "monkey", "kangaroo", "koala",
           "panda", "camel", "hedgehog", "squirrel", "otter", "beaver", "parrot", "swan", "duck", "goose", "pig",
           "chicken", "ant", "butterfly", "crab", "snail", "badger", "hamster", "gorilla", "cheetah", "leopard",
           "flamingo", "peacock", "raccoon", "lizard", "crocodile", "hippo", "rhino", "moose", "bison", "falcon",
           "seal", "walrus", "jellyfish", "lobster", "ostrich", "donkey", "llama")
FOODS = ("rice", "noodles", "cheese", "honey", "lettuce", "garlic", "onion", "spinach", "mango", "peach", "cherry",
         "coconut", "avocado", "pepper", "cucumber", "broccoli", "cabbage", "yogurt", "oats", "lentils", "tofu",
         "salmon", "tuna", "almonds", "walnuts", "peanuts", "pineapple", "strawberries", "blueberries", "watermelon",
         "plums", "pears", "kiwi", "ginger", "cinnamon", "basil", "mushrooms", "beef", "lamb", "turkey", "popcorn",
         "hummus", "quinoa", "pears", "celery", "beetroot", "zucchini", "olives", "raisins", "vinegar")
PASTIMES = ("gardening", "knitting", "hiking", "chess", "yoga", "fishing", "photography", "cycling", "jogging",
            "dancing", "baking", "camping", "pottery", "origami", "juggling", "sewing", "birdwatching", "rowing",
            "skating", "skiing", "surfing", "climbing", "meditation", "calligraphy", "woodworking", "archery",
            "sailing", "bowling", "karate", "chess puzzles", "crosswords", "stargazing", "journaling", "beekeeping",
            "canoeing", "snorkeling", "volunteering", "podcasting", "blogging", "composing")
REQUESTS = (
    "suggest a hobby for a rainy weekend", "how can i improve my memory", "how do i stay focused while studying",
    "what are some ways to reduce stress", "recommend a healthy snack", "how can i drink more water each day",
    "suggest a name for a bakery", "suggest a name for a coffee shop", "how can i wake up earlier",
    "what should i pack for a beach trip", "how do i plan a budget", "what is a quick dinner idea",
    "how can i be more productive", "suggest a fun activity for kids", "how do i calm down before an exam",
    "recommend an exercise for beginners", "how can i stop procrastinating", "what is a polite way to decline",
    "how do i prepare for an interview", "suggest a topic for a speech", "how can i reduce my screen time",
    "what is a healthy breakfast", "how do i tidy my desk", "how can i save money on groceries",
    "suggest a theme for a dinner party", "how do i apologize to a colleague", "what is a kind thing to do today",
    "how do i start a conversation with a stranger", "recommend a relaxing activity", "how can i stay motivated",
    "suggest a slogan for a cleaning company", "how should i organize my week", "what makes a good leader",
    "how do i care for a houseplant", "how can i get better at public speaking", "what is a fun fact",
    "summarize the benefits of exercise", "how do i boil pasta", "suggest a title for a mystery novel",
    "how can i focus better at my job", "recommend a board game for two", "how do i improve my handwriting",
    "how can i protect my eyes from screens", "how do i ask for a raise", "what should i do if i feel tired",
    "suggest a weekend plan", "how can i learn faster", "what are good manners at dinner",
    "how do i remember names", "how do i set a goal", "what is a healthy lunch", "suggest a quiz question",
    "how do i stay warm outdoors", "recommend a podcast topic", "how can i sleep better at night",
    "suggest a gift idea for a coworker", "what should i cook tonight", "how can i declutter my home",
    "how do i train a puppy", "how can i become more patient", "suggest an icebreaker question",
    "what is a polite way to say no", "how can i practise gratitude", "recommend a daily habit",
    "how do i prepare for a marathon", "how can i cheer up a sad friend", "what is a quick workout",
    "suggest a riddle", "suggest a short poem about autumn", "describe a perfect holiday",
    "how can i improve my posture", "how do i stop worrying", "recommend a way to unwind after work",
)
SMALL_TALK = (
    "who are you", "what can you do", "how is it going", "how are things", "how was your day", "are you okay",
    "what are you doing", "where are you from", "how old are you", "what do you enjoy", "see you later", "bye",
    "good night", "good evening", "cheers", "howdy", "greetings", "how have you been", "what is new",
    "are you busy", "can we chat", "do you have a favourite food", "what is your favourite season",
    "do you dream", "are you smart", "do you sleep", "what are your hobbies", "who created you", "what is up",
    "talk to me", "i am bored", "i am tired", "i am hungry", "i feel great today", "that is wonderful",
    "you are awesome", "well done", "sorry", "excuse me", "have a nice day", "take care", "nice job",
    "i am back", "long time no see", "how do you do", "what is on your mind", "am i talking to a computer",
    "do you like music", "do you have a family",
)


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest())


# ------------------------------------------------------------------------------------------------------- guard
class OpenSetGuard:
    """
    What the open evaluation set (`training.data.open_questions`) and the held-out countries forbid the behaviour
    prompts and their answers to hold (rules 1-3 of the module docstring). `qa_records`: the spoken QA (its test split
    gives the country probes, its train split the texts that are taught anyway).
    """

    def __init__(self, qa_records: list[dict]):
        import wordfreq

        from . import open_questions
        from .reading import held_out_words

        records = open_questions.load_open_questions() + open_questions.country_probes(qa_records)
        probe_kinds = set(open_questions.COUNTRY_PROBE_KINDS.values())
        self.prompt_words = set().union(*(open_questions.content_words(r["question"]) for r in records
                                          if r["kind"] not in probe_kinds))
        self.facts = [(open_questions.content_words(r["question"]),
                       [set(open_questions.words(answer)) for answer in r["answers"]], r["question"])
                      for r in records if r["kind"] not in probe_kinds and r["kind"] != open_questions.SMALL_TALK]
        taught = set()
        for record in qa_records:
            if record["split"] == "train":
                for text in (record["question"], record["answer"], *record["answers"]):
                    taught.update(open_questions.words(text))
        self.probe_keys = set()
        for record in records:
            if record.get("probe"):
                fresh = [w for w in open_questions.words(record["probe"])
                         if w not in taught and w not in open_questions.STOP_WORDS]
                if fresh:
                    self.probe_keys.add(min(fresh, key=lambda w: (wordfreq.zipf_frequency(w, "en"), w)))
        self.held_out = {open_questions.fold(word) for word in held_out_words(qa_records)}  # as `words` folds them
        self._words, self._content_words = open_questions.words, open_questions.content_words

    def prompt_problem(self, prompt: str) -> str | None:
        """Why `prompt` may not be a training prompt (None: it may)."""
        shared = self._content_words(prompt) & self.prompt_words
        if shared:
            return f"shares {sorted(shared)} with open evaluation questions"
        return self.text_problem(prompt)

    def text_problem(self, text: str) -> str | None:
        """Why `text` (an answer) may not be training text: it names a held-out or probe word, or teaches an open
        question's fact. None: it may."""
        words = set(self._words(text))
        named = words & (self.held_out | self.probe_keys)
        if named:
            return f"names {sorted(named)} (held-out country or hearing probe)"
        for question_words, answers, question in self.facts:
            if question_words <= words and any(answer <= words for answer in answers):
                return f"teaches the open question {question!r}"
        return None


# ------------------------------------------------------------------------------------------------------ prompts
def _job_titles() -> list[str]:
    from faker.providers.job.en_US import Provider

    return sorted({normalize_text(job) for job in Provider.jobs if "," not in job and "(" not in job})


def _families(qa_records: list[dict], vocabulary_words: int, seed: int) -> dict[str, tuple[tuple, list[str]]]:
    """{source: (templates, slot values)}."""
    from faker.providers.address.en_US import Provider as Address
    from faker.providers.currency import Provider as Currency
    from faker.providers.lorem.en_US import Provider as Lorem
    from faker.providers.person.en_US import Provider as Person

    from .listening_text import vocabulary

    pos = Lorem.parts_of_speech
    train = [r for r in qa_records if r["split"] == "train" and r["kind"] in ("capital", "continent")]
    countries = sorted({r["item"].split("-", 1)[1].replace("_", " ") for r in train})
    capitals = sorted({r["answers"][0] for r in train if r["kind"] == "capital"})
    lorem = set(pos["noun"]) | set(pos["verb"]) | set(pos["adjective"])
    # wordfreq's words beyond the first thousand (those are mostly function words and faker's word classes)
    words = [w for w in vocabulary(vocabulary_words + 2000)[1000:] if w not in lorem and len(w) > 3]
    words = sorted(_rng(seed, "vocabulary").sample(words, min(vocabulary_words, len(words))))
    names = sorted({normalize_text(name) for name in Person.first_names})
    numbers = sorted({number_words(n) for n in [*range(0, 101), *_rng(seed, "numbers").sample(range(101, 10000), 150)]})
    return {
        "nouns": (NOUN_TEMPLATES, sorted(set(pos["noun"]))),
        "verbs": (VERB_TEMPLATES, sorted(set(pos["verb"]) - {"be", "have", "do"})),
        "adjectives": (ADJECTIVE_TEMPLATES, sorted(set(pos["adjective"]))),
        "vocabulary": (VOCABULARY_TEMPLATES, words),
        "countries": (COUNTRY_TEMPLATES, countries),
        "cities": (CITY_TEMPLATES, capitals),
        "states": (STATE_TEMPLATES, sorted(normalize_text(s) for s in Address.states)),
        "currencies": (CURRENCY_TEMPLATES, sorted({normalize_text(name) for _, name in Currency.currencies})),
        "jobs": (JOB_TEMPLATES, _job_titles()),
        "numbers": (NUMBER_TEMPLATES, numbers),
        "names": (NAME_TEMPLATES, sorted(_rng(seed, "names").sample(names, 350))),
        "animals": (ANIMAL_TEMPLATES, sorted(set(ANIMALS))),
        "foods": (FOOD_TEMPLATES, sorted(set(FOODS))),
        "pastimes": (PASTIME_TEMPLATES, sorted(set(PASTIMES))),
    }


# Prompts drawn per slot value of each family (a value with several templates gets this many of them, seeded).
PER_VALUE = {"nouns": 2, "verbs": 1, "adjectives": 1, "vocabulary": 1, "countries": 3, "cities": 1, "states": 2,
             "currencies": 1, "jobs": 1, "numbers": 2, "names": 1, "animals": 3, "foods": 3, "pastimes": 3}


def prompt_set(qa_records: list[dict], guard: OpenSetGuard | None = None, vocabulary_words: int = 1500,
               seed: int = 0) -> tuple[list[dict], dict]:
    """
    (prompts `{"id", "prompt", "source"}` in a seeded order, statistics). Every prompt passes `guard` (default: an
    `OpenSetGuard` of `qa_records`); the statistics count what each source kept and dropped.
    """
    guard = guard or OpenSetGuard(qa_records)
    candidates = []
    for source, (templates, values) in _families(qa_records, vocabulary_words, seed).items():
        for value in values:
            rng = _rng(seed, source, value)
            for template in rng.sample(templates, min(PER_VALUE[source], len(templates))):
                candidates.append((source, template.format(x=value)))
    candidates += [("requests", text) for text in REQUESTS] + [("small_talk", text) for text in SMALL_TALK]
    prompts, seen, stats = [], set(), {}
    for source, text in candidates:
        text = re.sub(r"\ba (?=[aeiou])", "an ", normalize_text(text))
        counts = stats.setdefault(source, {"kept": 0, "dropped": 0})
        if text in seen:
            continue
        seen.add(text)
        if guard.prompt_problem(text):
            counts["dropped"] += 1
            continue
        counts["kept"] += 1
        prompts.append({"id": f"{source}-{hashlib.sha1(text.encode()).hexdigest()[:10]}", "prompt": text,
                        "source": source})
    _rng(seed, "order").shuffle(prompts)
    return prompts, stats


# ------------------------------------------------------------------------------------------------------- speech
def plan_speech(prompts: list[dict], voices=listening.LISTENING_VOICES, seed: int = 0) -> list[dict]:
    """One training voice (seeded by the prompt) and a listening augmentation per prompt; ValueError for a voice
    reserved for evaluation."""
    listening.check_training_voices(voices)
    jobs = []
    for item in prompts:
        text = item["prompt"]
        voice = _rng(seed, "behaviour-voice", text).choice(list(voices))
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        jobs.append({"id": f"{item['id']}-{voice}", "text": text, "voice": voice, "source": item["source"],
                     "audio": os.path.join("behaviour", voice, f"{digest}.wav"),
                     "augment": listening.draw_listening_augmentation(_rng(seed, "behaviour-augment", text, voice))})
    return jobs


def _speak_chunk(task) -> str:
    """Worker: speak one chunk (by voice), then write its manifest lines (which mark it done)."""
    out_dir, name, jobs = task
    manifest = os.path.join(out_dir, "behaviour", "chunks", f"{name}.jsonl")
    if os.path.isfile(manifest):
        return name
    import soundfile as sf

    by_voice: dict = {}
    for job in jobs:
        if not os.path.isfile(os.path.join(out_dir, job["audio"])):
            by_voice.setdefault(job["voice"], []).append(job)
    for voice, todo in by_voice.items():
        for job, audio in zip(todo, tts_voices.synthesize_texts(voice, [job["text"] for job in todo])):
            synthesize.write_wav(os.path.join(out_dir, job["audio"]), listening.augment(audio, job["augment"]))
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    with open(manifest + ".tmp", "w", encoding="utf-8") as handle:
        for job in jobs:
            duration = round(sf.info(os.path.join(out_dir, job["audio"])).duration, 3)
            handle.write(json.dumps({**job, "duration": duration}) + "\n")
    os.replace(manifest + ".tmp", manifest)
    return name


def speak_prompts(prompts: list[dict], speech_dir: str, workers: int = 2, seed: int = 0, verbose: bool = True) -> str:
    """Speak every prompt in its training voice (chunks of `CHUNK_SIZE`, finished chunks skipped) and write
    `<speech_dir>/behaviour.jsonl`; returns its path."""
    from multiprocessing import get_context

    jobs = plan_speech(prompts, seed=seed)
    missing = [voice for voice in sorted({job["voice"] for job in jobs}) if not tts_voices.voice_available(voice)]
    if missing:
        raise RuntimeError(f"TTS voices not available: {missing} (see training/data/tts_voices.py for the packages).")
    tasks = []
    for index in range(0, len(jobs), CHUNK_SIZE):
        chunk = jobs[index : index + CHUNK_SIZE]
        digest = hashlib.sha1("|".join(job["id"] for job in chunk).encode()).hexdigest()[:8]
        tasks.append((speech_dir, f"behaviour-{index // CHUNK_SIZE:05d}-{digest}", chunk))
    started = time.perf_counter()
    pool = None
    if workers > 1:
        pool = get_context("spawn").Pool(workers, initializer=synthesize._init_worker, initargs=(1,))
    try:
        for number, name in enumerate((pool.imap if pool else map)(_speak_chunk, tasks), start=1):
            if verbose:
                print(f"[behaviour] spoke {name} ({number}/{len(tasks)}) after {time.perf_counter() - started:.0f} s",
                      flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    path = os.path.join(speech_dir, "behaviour.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        for _, name, _ in tasks:
            with open(os.path.join(speech_dir, "behaviour", "chunks", f"{name}.jsonl"), encoding="utf-8") as handle:
                out.writelines(handle)
    os.replace(path + ".tmp", path)
    return path


# -------------------------------------------------------------------------------------------------- stage records
def stage_records(speech_manifest: str, answers: dict[str, dict], guard: OpenSetGuard) -> tuple[list[dict], dict]:
    """
    Stage-I manifest records `{"id", "audio", "transcript", "response", "response_ids"}` of the spoken prompts whose
    answer is finished and passes `guard` (absolute audio paths), and counts of what was left out and why.
    """
    base = os.path.dirname(os.path.abspath(speech_manifest))
    records, left_out = [], {"no_answer": 0, "unfinished": 0, "answer_refused": 0}
    for line in read_jsonl(speech_manifest):
        answer = answers.get(prompt_key(line["text"]))
        reason = ("no_answer" if answer is None else "unfinished" if not answer["finished"] or not answer["ids"]
                  else "answer_refused" if guard.text_problem(answer["answer"]) else None)
        if reason:
            left_out[reason] += 1
            continue
        records.append({"id": line["id"], "audio": os.path.join(base, line["audio"]), "transcript": line["text"],
                        "response": answer["answer"], "response_ids": answer["ids"]})
    return records, left_out


# ------------------------------------------------------------------------------------------------------------ CLI
def write_prompts(qa_path: str, out_dir: str, seed: int = 0) -> dict:
    """`<out_dir>/prompts.jsonl` and `prompts_stats.json`; returns the statistics."""
    prompts, stats = prompt_set(read_jsonl(qa_path), seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "prompts.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        for item in prompts:
            handle.write(json.dumps(item) + "\n")
    os.replace(path + ".tmp", path)
    summary = {"prompts": len(prompts), "distinct_words": len({w for p in prompts for w in p["prompt"].split()}),
               "sources": stats}
    with open(os.path.join(out_dir, "prompts_stats.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prompts", "answers", "speech", "manifest"))
    parser.add_argument("--out", required=True, help="the prompt set's directory (prompts.jsonl, answers.jsonl)")
    parser.add_argument("--qa", help="the recipe's qa.jsonl (prompts, manifest)")
    parser.add_argument("--speech", help="the speech directory (speech, manifest)")
    parser.add_argument("--manifest", help="the stage-I manifest to write (manifest)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="answer at most this many prompts in this run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    needs = {"prompts": ("qa",), "speech": ("speech",), "manifest": ("qa", "speech", "manifest")}.get(args.step, ())
    missing = [f"--{name}" for name in needs if getattr(args, name) is None]
    if missing:
        parser.error(f"the {args.step} step needs {' '.join(missing)}")
    prompts_path = os.path.join(args.out, "prompts.jsonl")
    if args.step == "prompts":
        print(json.dumps(write_prompts(args.qa, args.out, args.seed), indent=2))
        return
    prompts = read_jsonl(prompts_path)
    if args.step == "answers":
        print(answer_prompts([p["prompt"] for p in prompts], os.path.join(args.out, "answers.jsonl"),
                             batch_size=args.batch_size, limit=args.limit))
    elif args.step == "speech":
        print(speak_prompts(prompts, args.speech, args.workers, args.seed))
    else:
        from training.stages.data import write_manifest

        guard = OpenSetGuard(read_jsonl(args.qa))
        records, left_out = stage_records(os.path.join(args.speech, "behaviour.jsonl"),
                                          read_answers(os.path.join(args.out, "answers.jsonl")), guard)
        print(write_manifest(args.manifest, records), len(records), left_out)


if __name__ == "__main__":
    main()
