"""
Answer fragments in the answer voice for EchoX-mini's text-to-codec stage (II).

Streaming speaks an answer segment by segment, and the "fast" rule's first segment is a single word. A text-to-codec
decoder trained on whole answers only has never seen a segment end early: given "saudi" it goes on speaking a whole
answer. So stage II also reads fragments of the training answers: each answer cut after its first word, and once
more at a seeded random word, each piece spoken on its own.

    python -m training.data.fragments --qa build/data/qa.jsonl --out build/data/speech

Writes `<out>/fragments.jsonl` in the format of `reading.jsonl` (training answers only, so no held-out name is heard).
"""

import argparse
import os
import random

from .reading import synthesize_reading
from .spoken_qa import read_jsonl
from .tts_voices import ANSWER_VOICE


def fragment_texts(records: list[dict], seed: int = 0) -> list[str]:
    """Word-boundary pieces of the distinct training answers that are not whole answers themselves; deterministic."""
    answers = sorted({record["answer"] for record in records if record["split"] == "train"})
    rng = random.Random(seed)
    pieces = set()
    for answer in answers:
        words = answer.split()
        if len(words) < 2:
            continue
        cuts = {1} | ({rng.randint(2, len(words) - 1)} if len(words) > 2 else set())
        for cut in cuts:
            pieces.update((" ".join(words[:cut]), " ".join(words[cut:])))
    return sorted(pieces - set(answers))


def write_fragments(qa: str, out: str, voice: str = ANSWER_VOICE, workers: int = min(2, os.cpu_count() or 1),
                    seed: int = 0) -> str:
    """Speak the answer fragments of the QA JSONL `qa` into `out` (`fragments.jsonl`); returns the manifest's path."""
    texts = fragment_texts(read_jsonl(qa), seed)
    path = synthesize_reading(texts, out, voice, workers, name="fragments")
    print(f"{len(texts)} fragments → {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", required=True, help="QA JSONL from training.data.spoken_qa")
    parser.add_argument("--out", required=True, help="the speech directory of training.data.synthesize")
    parser.add_argument("--voice", default=ANSWER_VOICE)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_fragments(args.qa, args.out, args.voice, args.workers, args.seed)


if __name__ == "__main__":
    main()
