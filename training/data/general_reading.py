"""
General English read in the answer voice, for the unit vocoder only: sentences of common words, people's names,
towns, streets, jobs and companies (Faker, en_US, seeded), so the vocoder hears many more sounds and names than the
spoken-QA answers hold. Sentences with a word of a held-out country or capital are dropped.

    python -m training.data.general_reading --qa build/data/qa.jsonl --out build/data/speech [--count 2000]

Writes `<out>/general.jsonl` in the shape of `training.data.reading` (kind "general").
"""

import argparse
import os
import random

from .reading import held_out_words, synthesize_reading
from .spoken_qa import normalize_text, number_words, read_jsonl
from .tts_voices import ANSWER_VOICE

_TEMPLATES = (
    "{sentence}",
    "{sentence} {sentence}",
    "{name} lives on {street} in {city}",
    "{name} works as a {job} at {company}",
    "the train to {city} leaves at {hour} {minute}",
    "{name} bought {count} tickets and a {noun} for {name2}",
    "{sentence} said {name}",
)


def general_sentences(count: int, excluded: set[str], seed: int = 0) -> list[str]:
    """`count` distinct normalized sentences that use no word of `excluded`; deterministic for a seed."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    sentences, seen = [], set()
    while len(sentences) < count:
        text = rng.choice(_TEMPLATES).format_map(_FreshDraws(fake, rng))
        text = normalize_text(" ".join(number_words(int(t)) if t.isdigit() else t for t in text.split()))
        words = text.split()
        if text in seen or excluded & set(words) or not 3 <= len(words) <= 20:
            continue
        seen.add(text)
        sentences.append(text)
    return sentences


# Each template field's draw, from the seeded Faker and random.Random.
_FIELDS = {
    "sentence": lambda fake, rng: fake.sentence(nb_words=rng.randint(5, 10)),
    "name": lambda fake, rng: fake.name(),
    "name2": lambda fake, rng: fake.first_name(),
    "street": lambda fake, rng: fake.street_name(),
    "city": lambda fake, rng: fake.city(),
    "job": lambda fake, rng: fake.job().split(",")[0],
    "company": lambda fake, rng: fake.company(),
    "hour": lambda fake, rng: str(rng.randint(1, 12)),
    "minute": lambda fake, rng: str(rng.randint(10, 59)),
    "count": lambda fake, rng: str(rng.randint(2, 99)),
    "noun": lambda fake, rng: fake.word(part_of_speech="noun"),
}


class _FreshDraws(dict):
    """Template fields filled on use, so each placeholder (even a repeated one) draws a fresh value."""

    def __init__(self, fake, rng):
        super().__init__()
        self.fake, self.rng = fake, rng

    def __missing__(self, key):
        return _FIELDS[key](self.fake, self.rng)


def write_general_reading(qa: str, out: str, count: int = 2000, voice: str = ANSWER_VOICE,
                          workers: int = min(2, os.cpu_count() or 1), seed: int = 0) -> str:
    """Speak `count` general sentences (none with a held-out word of the QA JSONL `qa`) into `out` (`general.jsonl`)."""
    sentences = general_sentences(count, held_out_words(read_jsonl(qa)), seed)
    path = synthesize_reading(sentences, out, voice, workers, name="general")
    print(f"{len(sentences)} sentences → {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", required=True, help="QA JSONL from training.data.spoken_qa (defines the held-out set)")
    parser.add_argument("--out", required=True, help="the speech directory of training.data.synthesize")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--voice", default=ANSWER_VOICE)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_general_reading(args.qa, args.out, args.count, args.voice, args.workers, args.seed)


if __name__ == "__main__":
    main()
