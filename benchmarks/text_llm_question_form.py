"""How much the text-LLM baseline of `echox eval` depends on how the question is written; prints and writes JSON.

    python benchmarks/text_llm_question_form.py --model build/echox-mini --manifest build/data/speech/eval_test.jsonl \
        --out question_form.json

SmolLM2-135M-Instruct (the `text_llm_accuracy` baseline of EchoX-mini, `TextLLM`, greedy) answers every distinct
`question` of the manifest three ways: as written (the spoken-QA generator's lowercase text, no punctuation), with a
question mark, and with a question mark and the country, day and month names capitalized. Accuracy per kind, with
`echox eval`'s rule (a gold answer occurs as whole words in the normalized answer).
"""

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modeling_echox.evaluation.spoken_qa import base_text_llm, read_eval_manifest  # noqa: E402
from modeling_echox.evaluation.text_metrics import is_correct  # noqa: E402
from modeling_echox.model.loading import load_echox  # noqa: E402

DAYS_AND_MONTHS = set(
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july august "
    "september october november december".split()
)


def country_words(item: dict) -> set[str]:
    """The words of the country a capital or continent item asks about (from its id, `<kind>-<country>-...`)."""
    kind, country = item["id"].split("-")[:2]
    return set(country.split("_")) if kind in ("capital", "continent") else set()


def question_forms(question: str, names: set[str]) -> dict[str, str]:
    """The question as written, with a question mark, and with its names capitalized as well."""
    capitalized = " ".join(word.capitalize() if word in names | DAYS_AND_MONTHS else word for word in question.split())
    return {"as_written": question, "question_mark": question + "?", "names_capitalized": capitalized + "?"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an EchoX-mini checkpoint (its processor builds the prompt)")
    parser.add_argument("--manifest", required=True, help="an `echox eval` manifest with `question` fields")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, processor = load_echox(args.model)
    text_llm = base_text_llm(model, processor, "smollm2")
    items = {}
    for item in read_eval_manifest(args.manifest):
        if item.get("question"):
            items.setdefault(item["question"], item)
    questions = sorted(items)
    forms = {question: question_forms(question, country_words(items[question])) for question in questions}
    correct = defaultdict(lambda: defaultdict(int))
    for start in range(0, len(questions), args.batch_size):
        chunk = questions[start : start + args.batch_size]
        for form in ("as_written", "question_mark", "names_capitalized"):
            answers = text_llm([forms[question][form] for question in chunk])
            for question, answer in zip(chunk, answers):
                item = items[question]
                for kind in {"all", item.get("kind", "all")}:
                    correct[kind][form] += is_correct(item["answers"], answer)
    counts = defaultdict(int)
    for question in questions:
        for kind in {"all", items[question].get("kind", "all")}:
            counts[kind] += 1
    result = {
        "model": os.path.abspath(args.model),
        "questions": len(questions),
        "accuracy": {kind: {form: hits / counts[kind] for form, hits in forms_hits.items()}
                     for kind, forms_hits in correct.items()},
        "counts": dict(counts),
        "examples": [forms[question] for question in questions[:3]],
    }
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
