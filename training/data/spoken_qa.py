"""
Text side of the EchoX-mini spoken-QA data: question/answer pairs generated from `countryinfo` (capitals and
continents), the days of the week and the months (what comes after / before) and small arithmetic spelled out with
`num2words`, several phrasings per question, short spoken-style answers ("the capital of kenya is nairobi").

Splits (fixed seed):
- capitals and continents are split BY COUNTRY: a held-out country's questions (both kinds, every phrasing) are
  never in `train`, so they test what the text LLM already knows. Countries are stratified by continent.
- days, months and arithmetic are closed sets. `closed_split="item"` (the default) holds out whole items ("after
  monday", "3 plus 4"; all phrasings of an item share its split): a test question then asks the LLM for a fact it was
  never taught, which SmolLM2-135M mostly does not know (MODEL_CARD.md).
  `closed_split="phrasing"` (EchoX-mini's recipe, `training.echox_mini`) teaches every item but holds out one seeded phrasing of it for test (every day and
  month item; a `test_fraction` share of the arithmetic items) and another for dev (a `dev_fraction` share), so a
  test question is a known fact asked in words never trained on (and, after synthesis, by a voice never heard).

Every text is lowercase ASCII words without punctuation (what a TTS voice reads and an ASR transcript normalizes to).

Output JSONL, one line per (item, phrasing):
    {"id", "kind", "question", "answer", "answers": [gold strings], "split", "item", "phrasing"}

    python -m training.data.spoken_qa --out build/data/qa.jsonl [--seed 0] [--test-fraction 0.2]
"""

import argparse
import collections
import json
import os
import random
import re
import unicodedata

SPLITS = ("train", "dev", "test")
KINDS = ("capital", "continent", "day", "month", "arithmetic")
CLOSED_SPLITS = ("phrasing", "item")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)  # fmt: skip

# countryinfo's regions; "americas" is split into north / south america (countryinfo's subregions do not say).
SOUTH_AMERICA = {
    "argentina", "bolivia", "brazil", "chile", "colombia", "ecuador", "falkland islands", "french guiana",
    "guyana", "paraguay", "peru", "suriname", "uruguay", "venezuela",
}  # fmt: skip
CONTINENT_GOLD = {
    "africa": ["africa"],
    "asia": ["asia"],
    "europe": ["europe"],
    "oceania": ["oceania"],
    "north america": ["north america"],
    "south america": ["south america"],
}

# Other accepted answers (gold strings) where countryinfo's single capital is disputed, split or outdated; the spoken
# answer keeps countryinfo's. Countries whose capital is not a city are skipped for the capital question.
ALT_CAPITALS = {
    "bolivia": ["la paz"],
    "south africa": ["cape town", "bloemfontein"],
    "ivory coast": ["abidjan"],
    "sri lanka": ["sri jayawardenepura kotte", "kotte"],
    "benin": ["cotonou"],
    "tanzania": ["dar es salaam"],
    "myanmar": ["nay pyi taw", "naypyitaw"],
    "kazakhstan": ["astana"],
    "malaysia": ["putrajaya"],
    "swaziland": ["mbabane"],
    "palestine": ["jerusalem"],
    "ukraine": ["kiev"],
    "burundi": ["gitega"],
}
SKIP_CAPITAL = {"hong kong"}

CAPITAL_QUESTIONS = (
    "what is the capital of {country}",
    "what is the capital city of {country}",
    "which city is the capital of {country}",
    "tell me the capital of {country}",
    "name the capital of {country}",
)
CONTINENT_QUESTIONS = (
    "which continent is {country} in",
    "on which continent is {country}",
    "what continent is {country} located in",
    "{country} is on which continent",
)
SEQUENCE_QUESTIONS = {  # {unit} is "day" or "month"
    "after": (
        "what {unit} comes after {x}",
        "which {unit} follows {x}",
        "what is the {unit} after {x}",
        "name the {unit} that comes after {x}",
    ),
    "before": (
        "what {unit} comes before {x}",
        "which {unit} is just before {x}",
        "what is the {unit} before {x}",
        "name the {unit} that comes before {x}",
    ),
}
ARITHMETIC_QUESTIONS = {
    "plus": ("what is {a} plus {b}", "how much is {a} plus {b}", "what do you get when you add {a} and {b}"),
    "minus": ("what is {a} minus {b}", "how much is {a} minus {b}", "what do you get when you take {b} from {a}"),
    "times": ("what is {a} times {b}", "how much is {a} times {b}", "what is {a} multiplied by {b}"),
}


def normalize_text(text: str) -> str:
    """Lowercase ASCII words: accents folded, "st." → "saint", hyphens/punctuation → spaces, spaces collapsed."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"\bst\.?(?=\s)", "saint", text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "")
    return " ".join(text.split())


def number_words(value: int) -> str:
    """`num2words` without hyphens or "and": 21 → "twenty one"."""
    from num2words import num2words

    return normalize_text(num2words(value).replace(" and ", " "))


def _slug(text: str) -> str:
    return text.replace(" ", "_")


# ---------------------------------------------------------------------------------------------------- countries


def load_countries() -> list[dict]:
    """
    Countries from `countryinfo` with an ASCII name of at most 2 words and a single capital (accents folded),
    as `{"country", "capital", "continent"}` (lowercase), sorted by name, duplicates dropped.
    """
    import countryinfo

    rows = {}
    for entry in countryinfo.all_countries():
        try:
            name, capital, region = entry.name(), entry.capital(), entry.region()
        except Exception:  # pragma: no cover - malformed entries in the package data
            continue
        if not (isinstance(name, str) and isinstance(capital, str) and isinstance(region, str)):
            continue
        if not name.isascii() or len(name.split()) > 2 or not capital.strip() or "/" in capital:
            continue
        country = normalize_text(name)
        capital = normalize_text(capital)
        continent = region.strip().lower()
        if continent == "americas":
            continent = "south america" if country in SOUTH_AMERICA else "north america"
        if continent not in CONTINENT_GOLD or not country or not capital or country in rows:
            continue
        rows[country] = {"country": country, "capital": capital, "continent": continent}
    return [rows[key] for key in sorted(rows)]


def _held_out_sizes(count: int, test_fraction: float, dev_fraction: float) -> tuple[int, int]:
    """How many of `count` items (countries of a continent, items of a kind) go to test (at least one when
    `test_fraction` > 0) and to dev."""
    n_test = max(1, round(count * test_fraction)) if test_fraction > 0 else 0
    return n_test, round(count * dev_fraction)


def split_countries(countries: list[dict], seed: int, test_fraction: float, dev_fraction: float) -> dict[str, str]:
    """country → split, stratified by continent (each continent contributes its share to test and dev)."""
    rng = random.Random(f"countries-{seed}")
    by_continent = collections.defaultdict(list)
    for row in countries:
        by_continent[row["continent"]].append(row["country"])
    split = {}
    for continent in sorted(by_continent):
        names = sorted(by_continent[continent])
        rng.shuffle(names)
        n_test, n_dev = _held_out_sizes(len(names), test_fraction, dev_fraction)
        for index, name in enumerate(names):
            split[name] = "test" if index < n_test else "dev" if index < n_test + n_dev else "train"
    return split


def _split_items(keys: list[str], seed: int, kind: str, test_fraction: float, dev_fraction: float) -> dict[str, str]:
    rng = random.Random(f"{kind}-{seed}")
    keys = sorted(keys)
    rng.shuffle(keys)
    n_test, n_dev = _held_out_sizes(len(keys), test_fraction, dev_fraction)
    return {key: "test" if i < n_test else "dev" if i < n_test + n_dev else "train" for i, key in enumerate(keys)}


def _split_phrasings(
    keys: list[str], n_phrasings: int, seed: int, kind: str, test_fraction: float, dev_fraction: float
) -> dict[str, list[str]]:
    """item → the split of each of its phrasings: a `test_fraction` share of the items (at least one) hold out one
    seeded phrasing for test, a `dev_fraction` share (taken from the others while there are any) another for dev; every
    other phrasing is train."""
    rng = random.Random(f"{kind}-phrasings-{seed}")
    keys = sorted(keys)
    order = keys[:]
    rng.shuffle(order)
    n_test, n_dev = _held_out_sizes(len(keys), test_fraction, dev_fraction)
    test_items = set(order[:n_test])
    dev_items = set((order[n_test:] or order)[:n_dev])
    splits = {}
    for key in keys:
        phrasings = list(range(n_phrasings))
        rng.shuffle(phrasings)
        held = (["test"] if key in test_items else []) + (["dev"] if key in dev_items else [])
        item_splits = ["train"] * n_phrasings
        for split, phrasing in zip(held, phrasings):
            item_splits[phrasing] = split
        splits[key] = item_splits
    return splits


def _closed_splits(keys, n_phrasings, seed, kind, test_fraction, dev_fraction, closed_split) -> dict[str, list[str]]:
    """item → the split of each of its phrasings under `closed_split` (see the module docstring)."""
    if closed_split == "item":
        items = _split_items(keys, seed, kind, test_fraction, dev_fraction)
        return {key: [split] * n_phrasings for key, split in items.items()}
    return _split_phrasings(keys, n_phrasings, seed, kind, test_fraction, dev_fraction)


# ---------------------------------------------------------------------------------------------------- items


def _records(kind, item, split, questions, answer, answers):
    """One record per phrasing; `split` is the item's split, or a list with the split of each phrasing."""
    for index, question in enumerate(questions):
        yield {
            "id": f"{item}-p{index}",
            "kind": kind,
            "question": question,
            "answer": answer,
            "answers": answers,
            "split": split[index] if isinstance(split, list) else split,
            "item": item,
            "phrasing": index,
        }


def country_records(countries: list[dict], split_of: dict[str, str], capital_exclude_self: bool = True):
    for row in countries:
        country, capital, continent = row["country"], row["capital"], row["continent"]
        split = split_of[country]
        # "the capital of luxembourg is luxembourg" would be answered by echoing the question: skip those
        if country not in SKIP_CAPITAL and not (capital_exclude_self and (capital in country or country in capital)):
            yield from _records(
                "capital",
                f"capital-{_slug(country)}",
                split,
                [q.format(country=country) for q in CAPITAL_QUESTIONS],
                f"the capital of {country} is {capital}",
                [capital, *ALT_CAPITALS.get(country, [])],
            )
        yield from _records(
            "continent",
            f"continent-{_slug(country)}",
            split,
            [q.format(country=country) for q in CONTINENT_QUESTIONS],
            f"{country} is in {continent}",
            list(CONTINENT_GOLD[continent]),
        )


def sequence_records(seed: int, test_fraction: float, dev_fraction: float, closed_split: str = "item"):
    """Days and months, after / before. Split by phrasing, every item has a test phrasing (the sets are small)."""
    for kind, names in (("day", DAYS), ("month", MONTHS)):
        keys = [f"{kind}-{direction}-{name}" for direction in ("after", "before") for name in names]
        share = 1.0 if closed_split == "phrasing" else test_fraction
        n_phrasings = len(SEQUENCE_QUESTIONS["after"])
        split_of = _closed_splits(keys, n_phrasings, seed, kind, share, dev_fraction, closed_split)
        for direction in ("after", "before"):
            for index, name in enumerate(names):
                target = names[(index + (1 if direction == "after" else -1)) % len(names)]
                key = f"{kind}-{direction}-{name}"
                yield from _records(
                    kind,
                    key,
                    split_of[key],
                    [q.format(unit=kind, x=name) for q in SEQUENCE_QUESTIONS[direction]],
                    f"the {kind} {direction} {name} is {target}",
                    [target],
                )


def arithmetic_items(max_operand: int = 10) -> list[tuple[str, int, int, int]]:
    """(op, a, b, result): a, b in [0, max_operand] for plus / minus (minus only when a ≥ b), in [1, max_operand]
    for times."""
    items = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            items.append(("plus", a, b, a + b))
            if a >= b:
                items.append(("minus", a, b, a - b))
            if a >= 1 and b >= 1:
                items.append(("times", a, b, a * b))
    return items


def arithmetic_records(
    seed: int, test_fraction: float, dev_fraction: float, max_operand: int = 10, closed_split: str = "item"
):
    items = arithmetic_items(max_operand)
    keys = [f"arithmetic-{a}-{op}-{b}" for op, a, b, _ in items]
    n_phrasings = len(ARITHMETIC_QUESTIONS["plus"])
    split_of = _closed_splits(keys, n_phrasings, seed, "arithmetic", test_fraction, dev_fraction, closed_split)
    for (op, a, b, result), key in zip(items, keys):
        wa, wb, wr = number_words(a), number_words(b), number_words(result)
        yield from _records(
            "arithmetic",
            key,
            split_of[key],
            [q.format(a=wa, b=wb) for q in ARITHMETIC_QUESTIONS[op]],
            f"{wa} {op} {wb} is {wr}",
            [wr, str(result)],
        )


def generate_qa(
    seed: int = 0,
    test_fraction: float = 0.2,
    dev_fraction: float = 0.05,
    kinds: tuple[str, ...] = KINDS,
    max_operand: int = 10,
    closed_split: str = "item",
) -> list[dict]:
    """All QA records (see the module docstring); deterministic for a given seed."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown kinds {sorted(unknown)}; choose from {KINDS}.")
    if closed_split not in CLOSED_SPLITS:
        raise ValueError(f"closed_split must be one of {CLOSED_SPLITS}, got {closed_split!r}.")
    if not (0 <= test_fraction < 1 and 0 <= dev_fraction < 1 and test_fraction + dev_fraction < 1):
        raise ValueError("test_fraction and dev_fraction must be in [0, 1) and sum to less than 1.")
    records = []
    if {"capital", "continent"} & set(kinds):
        countries = load_countries()
        split_of = split_countries(countries, seed, test_fraction, dev_fraction)
        records += [r for r in country_records(countries, split_of) if r["kind"] in kinds]
    if {"day", "month"} & set(kinds):
        records += [r for r in sequence_records(seed, test_fraction, dev_fraction, closed_split) if r["kind"] in kinds]
    if "arithmetic" in kinds:
        records += list(arithmetic_records(seed, test_fraction, dev_fraction, max_operand, closed_split))
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):  # pragma: no cover - guarded by construction
        raise ValueError("Duplicate QA ids.")
    return records


def country_of(record: dict) -> str | None:
    """The country a capital/continent record is about (None for other kinds)."""
    if record["kind"] not in ("capital", "continent"):
        return None
    return record["item"].split("-", 1)[1].replace("_", " ")


def write_jsonl(records, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summarize(records: list[dict]) -> dict:
    """{split: {kind: (items, records)}}."""
    table: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [set(), 0]))
    for record in records:
        cell = table[record["split"]][record["kind"]]
        cell[0].add(record["item"])
        cell[1] += 1
    return {split: {kind: (len(c[0]), c[1]) for kind, c in kinds.items()} for split, kinds in table.items()}


def write_qa(out: str, seed: int = 0, test_fraction: float = 0.2, dev_fraction: float = 0.05, kinds=KINDS,
             max_operand: int = 10, closed_split: str = "item") -> list[dict]:
    """Generate the spoken-QA text (`generate_qa`), write it to the JSONL `out`, print a summary; returns the records."""
    records = generate_qa(seed, test_fraction, dev_fraction, tuple(kinds), max_operand, closed_split)
    write_jsonl(records, out)
    for split, by_kind in sorted(summarize(records).items()):
        print(split, ", ".join(f"{kind}: {items} items / {n} questions" for kind, (items, n) in sorted(by_kind.items())))
    print(f"wrote {len(records)} records to {out}")
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--dev-fraction", type=float, default=0.05)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    parser.add_argument("--max-operand", type=int, default=10)
    parser.add_argument("--closed-split", default="item", choices=CLOSED_SPLITS,
                        help="how days, months and arithmetic are held out (see above)")
    args = parser.parse_args(argv)
    write_qa(args.out, args.seed, args.test_fraction, args.dev_fraction, tuple(k for k in args.kinds.split(",") if k),
             args.max_operand, args.closed_split)


if __name__ == "__main__":
    main()
