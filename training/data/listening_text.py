"""
The sentences of the listening corpus (`training.data.listening`): broad read English from sources that install
offline, lowercase, numbers spelt out, in-word apostrophes kept ("don't"), no other punctuation.

Sources (each a function, deterministic for a seed):
    fortunes    real English sentences from the quotations of Debian's `fortunes` package (the topical files only:
                no code, art or Debian jokes), 4-20 words
    vocabulary  coverage lines over the `vocabulary()`: the most frequent English words of `wordfreq` that the
                `wamerican` dictionary holds and `better_profanity` does not flag (tens of thousands), each word in
                `repeats` lines of 4-9 words, some after a carrier phrase ("i said", "please write down")
    templates   everyday questions and requests, names (Faker, several English-speaking locales), places, numbers,
                years, prices, times and dates (num2words)
    general     `training.data.general_reading.general_sentences` (Faker sentences, people, towns, jobs)
A sentence holding a word of `excluded` (e.g. the held-out countries and capitals) is dropped everywhere.

    python -m training.data.listening_text [--vocabulary-size 40000]    # prints each source's size and words
"""

import argparse
import os
import random
import re
import unicodedata

FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_FILES = ("cookie", "education", "food", "fortunes", "humorists", "kids", "law", "literature", "love",
                 "magic", "medicine", "miscellaneous", "news", "people", "pets", "platitudes", "pratchett",
                 "riddles", "science", "songs-poems", "sports", "wisdom", "work")
DICTIONARY = "/usr/share/dict/words"
SOURCES = ("fortunes", "vocabulary", "templates", "general")
# Locales whose names and places Faker draws for the templates (English-speaking or commonly heard in English).
NAME_LOCALES = ("en_US", "en_GB", "en_IE", "en_IN", "en_AU", "en_NZ", "en_CA")

_CARRIERS = ("", "", "", "i said", "please write down", "the words are", "say", "next we have", "she said",
             "he wrote", "the list reads")


def corpus_text(text: str) -> str:
    """Lowercase ASCII words, digits → words ("42" → "forty two"), in-word apostrophes kept, other marks → spaces."""
    from .spoken_qa import number_words

    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group(0)))} " if len(m.group(0)) < 10 else " ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    words = [word.strip("'") for word in text.split()]
    return " ".join(word for word in words if word)


def _allowed(sentence: str, excluded: set[str], low: int = 3, high: int = 20) -> bool:
    words = sentence.split()
    return low <= len(words) <= high and not excluded & set(words)


def fortune_sentences(excluded: set[str] = frozenset(), directory: str = FORTUNE_DIR) -> list[str]:
    """The sentences (4-20 words, plain prose) of the quotations in `FORTUNE_FILES`, sorted, without duplicates."""
    missing = [name for name in FORTUNE_FILES if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing[:3]}: install the Debian package `fortunes`.")
    sentences = set()
    for name in FORTUNE_FILES:
        with open(os.path.join(directory, name), encoding="utf-8", errors="ignore") as handle:
            entries = handle.read().split("\n%\n")
        for entry in entries:
            # attribution lines ("-- Mark Twain") and indented verse/dialogue markers are not prose
            body = " ".join(line.strip() for line in entry.splitlines() if not line.strip().startswith("--"))
            for piece in re.split(r"(?<=[.!?])\s+", body):
                if re.search(r"[^A-Za-z0-9 ,.;:!?'\"()-]", piece):  # code, ASCII art, dialogue markup
                    continue
                sentence = corpus_text(piece)
                if _allowed(sentence, excluded, low=4):
                    sentences.add(sentence)
    return sorted(sentences)


_INFLECTIONS = ("", "s", "es", "ed", "er", "ers", "ing", "y")  # a flagged word's inflections are flagged too


def _profane() -> set[str]:
    import better_profanity

    path = os.path.join(os.path.dirname(better_profanity.__file__), "profanity_wordlist.txt")
    with open(path, encoding="utf-8") as handle:
        return {line.strip().lower() for line in handle if line.strip()}


def vocabulary(size: int = 40000, excluded: set[str] = frozenset(), dictionary: str = DICTIONARY) -> list[str]:
    """
    The English words of `wordfreq`'s `size` most frequent, most frequent first, that are plain lowercase letters,
    appear in `dictionary` (any case), are not flagged by `better_profanity` (nor inflections of a flagged word) and
    are not in `excluded`.
    """
    import wordfreq

    if not os.path.isfile(dictionary):
        raise FileNotFoundError(f"{dictionary} is missing: install the Debian package `wamerican`.")
    with open(dictionary, encoding="utf-8", errors="ignore") as handle:
        known = {line.strip().lower() for line in handle}
    profane = _profane()
    return [
        word for word in wordfreq.top_n_list("en", size)
        if re.fullmatch(r"[a-z]+", word) and (len(word) > 1 or word in ("a", "i")) and word in known
        and word not in excluded and not any(word.endswith(end) and word[: len(word) - len(end)] in profane
                                             for end in _INFLECTIONS)
    ]


def coverage_sentences(words: list[str], repeats: int = 2, seed: int = 0) -> list[str]:
    """Lines of 4-9 words in which every word of `words` appears `repeats` times (after a carrier phrase or not)."""
    rng = random.Random(f"coverage-{seed}")
    pool = [word for word in words for _ in range(repeats)]
    rng.shuffle(pool)
    sentences, start = [], 0
    while start < len(pool):
        size = rng.randint(4, 9)
        line = " ".join(pool[start : start + size])
        carrier = rng.choice(_CARRIERS)
        sentences.append(f"{carrier} {line}".strip())
        start += size
    return sentences


_TEMPLATES = (
    "what is a {noun}", "what does the word {word} mean", "how do you spell {word}", "can you tell me about {noun}s",
    "where can i buy a {adjective} {noun}", "how do i {verb} a {noun}", "please {verb} the {noun}",
    "could you {verb} the {noun} for me", "why do people {verb}", "is it {adjective} to {verb} every day",
    "who is {name}", "where is {place}", "how far is {place} from {place2}", "what time is it in {place}",
    "call {first} at {phone}", "send a message to {name} saying {sentence}", "set a timer for {small} minutes",
    "remind me to {verb} the {noun} at {hour} {ampm}", "wake me up at {hour} {minute}",
    "how much is {price} dollars in pounds", "it costs {price} dollars and {cents} cents",
    "{name} was born in {year}", "in {year} {name} moved to {place}", "the meeting is on the {ordinal} of {month}",
    "my flight to {place} leaves on {weekday} at {hour} {minute}", "there are {count} {noun}s in the {noun2}",
    "{first} and {first2} went to {place} last {weekday}", "turn the {noun} {onoff}", "play some {genre} music",
    "what is the weather like in {place} today", "i would like {count} {noun}s please", "thank you {first}",
    "good {daytime} {first} how are you", "tell me a story about a {adjective} {noun}", "{sentence}",
    "is {place} bigger than {place2}", "how many {noun}s does a {noun2} have", "what is {count} plus {small}",
    "the {ordinal} house on {street} is {adjective}", "my name is {name} and i live in {place}",
)
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_GENRES = ("jazz", "rock", "classical", "country", "folk", "pop", "blues", "reggae", "soul", "piano", "dance")


class _Slots(dict):
    """Template fields, each drawn fresh on use from the seeded Fakers and random.Random."""

    def __init__(self, fakers, rng):
        super().__init__()
        self.fakers, self.rng = fakers, rng

    def __missing__(self, key):
        from num2words import num2words

        words, fake, rng = self.fakers[0], self.rng.choice(self.fakers), self.rng  # en_US alone has word classes
        draws = {
            "noun": lambda: words.word(part_of_speech="noun"), "noun2": lambda: words.word(part_of_speech="noun"),
            "verb": lambda: words.word(part_of_speech="verb"),
            "adjective": lambda: words.word(part_of_speech="adjective"), "word": words.word, "name": fake.name, "first": fake.first_name, "first2": fake.first_name,
            "place": fake.city, "place2": fake.city, "street": fake.street_name,
            "phone": lambda: " ".join(str(rng.randint(0, 9)) for _ in range(rng.choice((7, 10)))),
            "small": lambda: str(rng.randint(2, 60)), "count": lambda: str(rng.randint(2, 999)),
            "hour": lambda: str(rng.randint(1, 12)), "minute": lambda: str(rng.choice((15, 30, 45, rng.randint(10, 59)))),
            "ampm": lambda: rng.choice(("am", "pm", "in the morning", "tonight")),
            "price": lambda: str(rng.randint(1, 5000)), "cents": lambda: str(rng.randint(1, 99)),
            "year": lambda: num2words(rng.randint(1700, 2030), to="year"),
            "ordinal": lambda: num2words(rng.randint(1, 31), to="ordinal"), "month": lambda: rng.choice(_MONTHS),
            "weekday": lambda: rng.choice(_WEEKDAYS), "onoff": lambda: rng.choice(("on", "off", "up", "down")),
            "genre": lambda: rng.choice(_GENRES), "daytime": lambda: rng.choice(("morning", "afternoon", "evening")),
            "sentence": lambda: words.sentence(nb_words=rng.randint(4, 8)),
        }
        return draws[key]()


def templated_sentences(count: int, excluded: set[str] = frozenset(), seed: int = 0) -> list[str]:
    """`count` distinct everyday questions, requests and statements over names, places and numbers."""
    from faker import Faker

    fakers = []
    for index, locale in enumerate(NAME_LOCALES):
        fake = Faker(locale)
        fake.seed_instance(seed * 100 + index)
        fakers.append(fake)
    rng = random.Random(f"templates-{seed}")
    sentences, seen, attempts = [], set(), 0
    while len(sentences) < count:
        attempts += 1
        if attempts > 50 * count:
            raise ValueError(f"Only {len(sentences)} distinct template sentences for {count} asked: too many excluded.")
        text = corpus_text(rng.choice(_TEMPLATES).format_map(_Slots(fakers, rng)))
        if text in seen or not _allowed(text, excluded):
            continue
        seen.add(text)
        sentences.append(text)
    return sentences


def listening_sentences(excluded: set[str] = frozenset(), vocabulary_size: int = 40000, repeats: int = 2,
                        templates: int = 6000, general: int = 2000, seed: int = 0) -> dict[str, list[str]]:
    """{source: sentences} for every source of `SOURCES`; a sentence appears under one source only."""
    from .general_reading import general_sentences

    by_source = {
        "fortunes": fortune_sentences(excluded),
        "vocabulary": coverage_sentences(vocabulary(vocabulary_size, excluded), repeats, seed),
        "templates": templated_sentences(templates, excluded, seed),
        "general": [corpus_text(s) for s in general_sentences(general, set(excluded), seed + 2000)],
    }
    seen: set[str] = set()
    for source in SOURCES:
        kept = []
        for sentence in by_source[source]:
            if sentence not in seen and _allowed(sentence, excluded):
                seen.add(sentence)
                kept.append(sentence)
        by_source[source] = kept
    return by_source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabulary-size", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    by_source = listening_sentences(vocabulary_size=args.vocabulary_size, seed=args.seed)
    everything = set()
    for source, sentences in by_source.items():
        words = {w for s in sentences for w in s.split()}
        everything |= words
        print(f"{source}: {len(sentences)} sentences, {len(words)} distinct words, e.g. {sentences[len(sentences) // 2]!r}")
    print(f"all: {sum(map(len, by_source.values()))} sentences, {len(everything)} distinct words")


if __name__ == "__main__":
    main()
