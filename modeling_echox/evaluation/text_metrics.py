"""
Text normalization, word error rate and answer matching for evaluating spoken answers (`echox eval`, the vocoder's
resynthesis check).
"""

import re
import unicodedata

_NUMBER_RE = re.compile(r"\d+(?:st|nd|rd|th)|\d+(?:\.\d+)?")  # an ordinal suffix only after a whole number


def _number_to_words(match: re.Match) -> str:
    try:
        from num2words import num2words
    except ImportError:
        return match.group(0)
    token = match.group(0)
    if token[-2:] in ("st", "nd", "rd", "th"):
        return " " + num2words(int(token[:-2]), to="ordinal") + " "
    value = float(token) if "." in token else int(token)
    return " " + num2words(value) + " "


def normalize_text(text: str) -> str:
    """
    Lowercase, numbers to words (via num2words if installed: "21" → "twenty one", "3rd" → "third", "2.5" → "two
    point five"; thousands separators dropped), "%" → "percent", "&" → "and", apostrophes dropped ("don't" →
    "dont"), every other punctuation mark → space, whitespace collapsed.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.replace("%", " percent ").replace("&", " and ")
    text = _NUMBER_RE.sub(_number_to_words, text)
    text = re.sub(r"['’`]", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) between two already normalized strings."""
    ref, hyp = reference.split(), hypothesis.split()
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1], len(ref)


def word_error_rate(references: list[str], hypotheses: list[str], normalize: bool = True) -> float:
    """Corpus WER: total word errors / total reference words (texts normalized with `normalize_text` first)."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses must have the same length.")
    errors = words = 0
    for reference, hypothesis in zip(references, hypotheses):
        if normalize:
            reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
        item_errors, item_words = word_errors(reference, hypothesis)
        errors += item_errors
        words += item_words
    if words == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / words


def answer_in_text(answer: str, text: str) -> bool:
    """Whether the normalized `answer` occurs in the normalized `text` as a run of whole words ("seven" is not in
    "seventeen")."""
    answer_words, text_words = normalize_text(answer).split(), normalize_text(text).split()
    if not answer_words:
        return False
    size = len(answer_words)
    return any(text_words[i : i + size] == answer_words for i in range(len(text_words) - size + 1))


def all_answer_words_in_text(answer: str, text: str) -> bool:
    """The looser all-words rule: every word of the normalized `answer` is a word of the normalized `text`."""
    answer_words, text_words = normalize_text(answer).split(), set(normalize_text(text).split())
    return bool(answer_words) and all(word in text_words for word in answer_words)


def is_correct(answers: list[str], text: str, rule: str = "contained") -> bool:
    """Any gold answer matches `text` under `rule` ("contained": whole-word run; "all_words": every word present)."""
    if rule not in ("contained", "all_words"):
        raise ValueError(f"rule must be 'contained' or 'all_words', got {rule!r}.")
    match = answer_in_text if rule == "contained" else all_answer_words_in_text
    return any(match(answer, text) for answer in answers)
