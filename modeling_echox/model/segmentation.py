"""Where EchoX cuts the generated text into segments that the echo decoder speaks one by one."""

from dataclasses import dataclass

import torch

from .generation_configuration_echox import EchoXGenerationConfig

PUNCTUATION = (".", ",", "?", "!", ";", ":")


class SegmentationRule:
    """A rule that decides, token by token, where a segment of the answer ends."""

    def cut_after(self, scores: list[float], texts: list[str], segment_start: int) -> int | None:
        """
        Called once the token at index `len(scores) - 1` has been generated (`scores`: boundary scores, `texts`: the
        decoded tokens): returns the index of the last token of a segment that ends now, or `None`.
        """
        raise NotImplementedError

    def split(self, scores: list[float], texts: list[str]) -> list[tuple[int, int]]:
        """All segments `[start, end)` of a finished generation; the rest after the last cut is the final segment."""
        segments, start = [], 0
        for end in range(1, len(scores) + 1):
            cut = self.cut_after(scores[:end], texts[:end], start)
            if cut is not None:
                segments.append((start, cut + 1))
                start = cut + 1
        if start < len(scores):
            segments.append((start, len(scores)))
        return segments


@dataclass(frozen=True)
class FaithfulSegmentation(SegmentationRule):
    """
    The released EchoX rule (`"faithful"`). Each generated token t gets a score s_t = cos(h_t, w), the cosine between
    the hidden state that produced it and the LLM output-embedding row of "." (`boundary_token_id`). Token c is
    confirmed as a peak `lookahead` tokens later if s_c is the maximum of s over [c - lookahead, c + lookahead]. A
    segment ends after a peak c once it holds `max_tokens` tokens, or `min_tokens` tokens when s_c > `threshold`.
    """

    lookahead: int = 5
    min_tokens: int = 20
    threshold: float = 0.1
    max_tokens: int = 50

    def cut_after(self, scores, texts, segment_start):
        check = len(scores) - 1 - self.lookahead
        if check < 0:
            return None
        window = scores[max(0, check - self.lookahead) : check + self.lookahead + 1]
        if scores[check] != max(window):
            return None
        length = check - segment_start
        if length >= self.max_tokens or (scores[check] > self.threshold and length >= self.min_tokens):
            return check
        return None


@dataclass(frozen=True)
class FastSegmentation(SegmentationRule):
    """
    The low-latency rule (`"fast"`): cuts at word boundaries, known one token later (the next token starts with a
    space, or the last one ends with punctuation; punctuation stays with the word before it). The first segment ends
    at the first boundary after `first_tokens` tokens; later ones at punctuation once they hold `min_tokens`, or at any
    word boundary once they hold `max_tokens`. With `first_whole_words=False` the first segment is exactly the first
    `first_tokens` tokens, cut as soon as the last of them is generated, even inside a word: the LLM's next token is
    not waited for.
    """

    first_tokens: int = 3
    min_tokens: int = 8
    max_tokens: int = 24
    first_whole_words: bool = True

    def cut_after(self, scores, texts, segment_start):
        if segment_start == 0 and not self.first_whole_words:
            return len(texts) - 1 if len(texts) == self.first_tokens else None
        if len(texts) < 2:
            return None
        last, following = len(texts) - 2, texts[-1]
        if following.lstrip()[:1] in PUNCTUATION and following.strip():
            return None
        ends_clause = texts[last].rstrip().endswith(PUNCTUATION)
        if not (ends_clause or following[:1].isspace()):
            return None
        length = last + 1 - segment_start
        if segment_start == 0:
            return last if length >= self.first_tokens else None
        if (ends_clause and length >= self.min_tokens) or length >= self.max_tokens:
            return last
        return None


def segmentation_rule(generation_config, mode: str | None = None) -> SegmentationRule:
    """
    The rule of `mode` ("faithful" or "fast"; default: the generation config's `segmentation_mode`) with the
    generation config's parameters (an [`EchoXGenerationConfig`]; fields it lacks take their defaults).
    """
    config = EchoXGenerationConfig.from_generation_config(generation_config)
    mode = mode or config.segmentation_mode
    if mode == "faithful":
        return FaithfulSegmentation(
            lookahead=config.segment_lookahead,
            min_tokens=config.segment_min_tokens,
            threshold=config.segment_score_threshold,
            max_tokens=config.segment_max_tokens,
        )
    if mode == "fast":
        return FastSegmentation(
            first_tokens=config.fast_first_segment_tokens,
            min_tokens=config.fast_min_segment_tokens,
            max_tokens=config.fast_max_segment_tokens,
            first_whole_words=config.fast_first_segment_whole_words,
        )
    raise ValueError(f"Unknown segmentation mode {mode!r}; use 'faithful' or 'fast'.")


def boundary_scores(hidden_states: torch.Tensor, boundary_embedding: torch.Tensor) -> list[float]:
    """Cosine similarity of each hidden state `[n, H]` with the boundary token's output embedding `[H]`."""
    scores = torch.nn.functional.cosine_similarity(hidden_states.float(), boundary_embedding.float()[None], dim=-1)
    return scores.tolist()
