"""The streaming rule: where EchoX cuts the generated text into segments that the echo decoder speaks one by one."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentationRule:
    """
    The released EchoX rule. Each generated token t gets a score s_t = cos(h_t, w), the cosine between the hidden state
    that produced it and the LLM output-embedding row of "." (`boundary_token_id`). Token c is confirmed as a peak
    `lookahead` tokens later if s_c is the maximum of s over [c - lookahead, c + lookahead]. A segment ends after a
    peak c once it holds `max_tokens` tokens, or `min_tokens` tokens when s_c > `threshold`.
    """

    lookahead: int = 5
    min_tokens: int = 20
    threshold: float = 0.1
    max_tokens: int = 50

    @classmethod
    def from_config(cls, config) -> "SegmentationRule":
        return cls(
            lookahead=config.segment_lookahead,
            min_tokens=config.segment_min_tokens,
            threshold=config.segment_score_threshold,
            max_tokens=config.segment_max_tokens,
        )

    def cut_after(self, scores: list[float], segment_start: int) -> int | None:
        """
        Called once the token at index `len(scores) - 1` has been generated: returns the index c of the last token of
        a segment that ends now, or `None`.
        """
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

    def split(self, scores: list[float]) -> list[tuple[int, int]]:
        """All segments `[start, end)` of a finished generation; the rest after the last cut is the final segment."""
        segments, start = [], 0
        for end in range(1, len(scores) + 1):
            cut = self.cut_after(scores[:end], start)
            if cut is not None:
                segments.append((start, cut + 1))
                start = cut + 1
        if start < len(scores):
            segments.append((start, len(scores)))
        return segments


def boundary_scores(hidden_states: torch.Tensor, boundary_embedding: torch.Tensor) -> list[float]:
    """Cosine similarity of each hidden state `[n, H]` with the boundary token's output embedding `[H]`."""
    scores = torch.nn.functional.cosine_similarity(hidden_states.float(), boundary_embedding.float()[None], dim=-1)
    return scores.tolist()
