"""
Extra read speech in the answer voice for EchoX-mini: more words for the unit k-means, the vocoder and the
text-to-codec stage (II) than the ~560 distinct training answers alone give.

Sentences come from `countryinfo` facts about TRAINING countries only (provinces, demonyms, neighbours) plus numbers,
days and months. A sentence is dropped when it mentions any word of a dev/test country or of its capital, so the
held-out countries stay unheard in every training stage.

    python -m training.data.reading --qa build/data/qa.jsonl --out build/data/speech [--limit 1500]

Writes `<out>/reading.jsonl`: `{"id", "answer_audio", "answer_text", "response", "split": "train", "kind": "reading"}`
(audio paths relative to `<out>`), the shape stage 0 and stage II read.
"""

import argparse
import json
import os
import random

from .spoken_qa import (
    DAYS,
    MONTHS,
    country_of,
    normalize_text,
    number_words,
    read_jsonl,
)
from .synthesize import answer_audio_name, run_synthesis
from .tts_voices import ANSWER_VOICE


def _country_facts(name: str) -> list[str]:
    from countryinfo import CountryInfo

    try:
        info = CountryInfo(name).info()
    except Exception:  # countryinfo has no entry under our normalized name
        return []
    facts = []
    for province in (info.get("provinces") or [])[:6]:
        province = normalize_text(province)
        if province and province.isascii() and len(province.split()) <= 3:
            facts.append(f"{province} is a region of {name}")
    demonym = normalize_text(info.get("demonym") or "")
    if demonym and demonym.isascii():
        facts.append(f"people from {name} are called {demonym}")
    return facts


def held_out_words(records: list[dict]) -> set[str]:
    """Words of held-out (dev/test) countries and their capitals that no training name shares."""
    train_words, held_out = set(), set()
    for record in records:
        country = country_of(record)
        if country is None:
            continue
        names = [country] + (record["answers"] if record["kind"] == "capital" else [])
        if record["split"] == "train":
            train_words.update(word for name in names[:2] for word in name.split())  # a capital's canonical name only
        else:
            held_out.update(word for name in names for word in name.split())
    # Words shared with training names (e.g. "south", "republic") stay allowed.
    return held_out - train_words - {"the", "of", "and", "is", "city"}


def reading_sentences(records: list[dict], limit: int | None = None, seed: int = 0) -> list[str]:
    """Read-speech sentences that name no word of a held-out (dev/test) country or capital; deterministic."""
    train_countries, capitals = set(), {}
    for record in records:
        country = country_of(record)
        if country is not None and record["split"] == "train":
            train_countries.add(country)
            if record["kind"] == "capital":
                capitals[country] = record["answers"][0]
    excluded = held_out_words(records)

    sentences = []
    for country in sorted(train_countries):
        sentences += _country_facts(country)
        if country in capitals:
            sentences.append(f"{capitals[country]} is a city in {country}")
    sentences += [f"{day} comes before {DAYS[(i + 1) % 7]}" for i, day in enumerate(DAYS)]
    sentences += [f"{month} is followed by {MONTHS[(i + 1) % 12]}" for i, month in enumerate(MONTHS)]
    sentences += [f"the number {number_words(n)}" for n in range(0, 101)]
    sentences = sorted({normalize_text(s) for s in sentences})
    sentences = [s for s in sentences if not excluded & set(s.split())]
    random.Random(seed).shuffle(sentences)
    return sentences[:limit] if limit else sentences


def synthesize_reading(
    sentences: list[str], out_dir: str, voice: str = ANSWER_VOICE, workers: int = 2, name: str = "reading"
) -> str:
    """
    Speak `sentences` in `voice` under `out_dir` (existing files are kept) and write `<out_dir>/<name>.jsonl`
    (ids `<name>-<i>`, kind `name`).
    """
    items = [(answer_audio_name(text, voice), text, None) for text in sentences]
    tasks = [(out_dir, voice, items[start : start + 48]) for start in range(0, len(items), 48)]
    run_synthesis(tasks, workers)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for index, (audio, text, _) in enumerate(items):
            line = {"id": f"{name}-{index}", "answer_audio": audio, "answer_text": text, "response": text,
                    "split": "train", "kind": name}
            handle.write(json.dumps(line) + "\n")
    return path


def write_reading(qa: str, out: str, voice: str = ANSWER_VOICE, limit: int | None = None,
                  workers: int = min(2, os.cpu_count() or 1), seed: int = 0) -> str:
    """Speak the read sentences of the QA JSONL `qa` into `out` (`reading.jsonl`); returns the manifest's path."""
    sentences = reading_sentences(read_jsonl(qa), limit, seed)
    path = synthesize_reading(sentences, out, voice, workers)
    print(f"{len(sentences)} sentences → {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", required=True, help="QA JSONL from training.data.spoken_qa (defines the held-out set)")
    parser.add_argument("--out", required=True, help="the speech directory of training.data.synthesize")
    parser.add_argument("--voice", default=ANSWER_VOICE)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_reading(args.qa, args.out, args.voice, args.limit, args.workers, args.seed)


if __name__ == "__main__":
    main()
