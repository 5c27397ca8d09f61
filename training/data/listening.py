"""
Listening practice for stage I: general English read by the TRAINING voices, augmented like the questions, so that the
speech adapter learns to pass on words no question contains (people's and town names, common words) instead of only
the spoken-QA vocabulary. Each clip becomes a stage-I example "repeat what I said" (`stage_records`): the audio, then
`LISTEN_PROMPT` as user text; the transcript is both the CTC target and the response.

The sentences are `training.data.general_reading.general_sentences` drawn with their own seed (other sentences than
the vocoder's general set), so they hold no word of a held-out country or capital either.

    python -m training.data.listening --qa build/data/qa.jsonl --out build/data/speech [--count 2000]

Writes `<out>/listening.jsonl`: `{"id", "audio", "text", "voice", "augment", "duration", "split": "train",
"kind": "listening"}` (audio paths relative to `<out>`).
"""

import argparse
import hashlib
import json
import os

from .general_reading import general_sentences
from .reading import held_out_words
from .spoken_qa import read_jsonl
from .synthesize import TRAIN_VOICES, VOICES, _chunks, _rng, draw_augmentation, run_synthesis

LISTEN_PROMPT = "Repeat exactly what I said."
# general_reading uses seed 0 for the vocoder's sentences; listening draws from this offset of the seed.
SENTENCE_SEED_OFFSET = 1000


def plan_listening(sentences: list[str], voices=TRAIN_VOICES, seed: int = 0) -> list[dict]:
    """One job per sentence: a training voice and augmentation parameters drawn from (seed, sentence)."""
    unknown = [voice for voice in voices if voice not in VOICES]
    if unknown:
        raise ValueError(f"Unknown voices {unknown}; choose from {sorted(VOICES)}.")
    jobs = []
    for index, text in enumerate(sentences):
        voice = _rng(seed, "listening", text).choice(list(voices))
        name = hashlib.sha1(text.encode()).hexdigest()[:16]
        jobs.append({
            "id": f"listening-{index}-{voice}",
            "audio": os.path.join("listening", voice, f"{name}.wav"),
            "text": text,
            "voice": voice,
            "augment": draw_augmentation(_rng(seed, "listening", text, voice)),
        })
    return jobs


def synthesize_listening(jobs: list[dict], out_dir: str, workers: int = 2) -> str:
    """Speak the planned jobs under `out_dir` (existing files are kept) and write `<out_dir>/listening.jsonl`."""
    voice_items: dict = {}
    for job in jobs:
        voice_items.setdefault(job["voice"], []).append((job["audio"], job["text"], job["augment"]))
    durations, _ = run_synthesis(list(_chunks(voice_items, 48, out_dir)), workers)
    path = os.path.join(out_dir, "listening.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for job in jobs:
            line = {**job, "duration": round(durations[job["audio"]], 3), "split": "train", "kind": "listening"}
            handle.write(json.dumps(line) + "\n")
    return path


def stage_records(manifest: str) -> list[dict]:
    """`listening.jsonl` → stage-I manifest records (absolute audio paths, `LISTEN_PROMPT`, transcript = response)."""
    base = os.path.dirname(os.path.abspath(manifest))
    return [
        {"id": r["id"], "audio": os.path.join(base, r["audio"]), "transcript": r["text"], "prompt": LISTEN_PROMPT,
         "response": r["text"]}
        for r in read_jsonl(manifest)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", required=True, help="QA JSONL from training.data.spoken_qa (defines the held-out set)")
    parser.add_argument("--out", required=True, help="the speech directory of training.data.synthesize")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sentences = general_sentences(args.count, held_out_words(read_jsonl(args.qa)), args.seed + SENTENCE_SEED_OFFSET)
    path = synthesize_listening(plan_listening(sentences, seed=args.seed), args.out, args.workers)
    print(f"{len(sentences)} sentences → {path}")


if __name__ == "__main__":
    main()
