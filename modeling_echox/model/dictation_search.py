"""
The adapter's dictation found by CTC prefix beam search, with the LLM itself as a shallow-fusion language model: of the
token sequences the CTC head can spell, the one that maximises log P_ctc(ids | speech) + `lm_weight` · log P_llm(ids |
the prompt text before the speech), the LLM scoring the ids as the words its user says (`adapter_output="dictation"`).
"""

import math
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

# A frame's candidate tokens: those within this many nats of the frame's most likely token (blank included); frames
# where blank is far ahead (most of them) then extend no prefix, and the language model is only asked about real words.
CANDIDATE_LOG_PROB_MARGIN = 10.0

Prefix = tuple[int, ...]


def _log_add(*values: float) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(value - top) for value in values))


class LanguageModelPrefixScorer:
    """
    `scorer(prefixes)` → `[len(prefixes), V]` log-probabilities of the token after `context` + each prefix, by
    `language_model` (a causal LM taking `input_ids`, `attention_mask`, `position_ids`, `past_key_values`; its cache a
    `DynamicCache`). Each prefix is scored once, by running only its last token on its parent's keys and values (kept
    per scored prefix; a parent not scored yet is scored first), the prefixes of one call batched together. Context
    positions holding an id of `masked_ids` are not attended to (EchoX's `mask_eot_in_prompt`); positions count them
    all the same.
    """

    def __init__(self, language_model, context: Sequence[int], pad_token_id: int = 0, masked_ids: Sequence[int] = ()):
        if not context:
            raise ValueError("The language model needs a context to score the dictation after (at least one token).")
        self.language_model = language_model
        self.pad_token_id = pad_token_id
        device = language_model.get_input_embeddings().weight.device
        self.context_ids = torch.tensor([list(context)], dtype=torch.long, device=device)
        self.context_mask = (~torch.isin(self.context_ids, torch.tensor(list(masked_ids), device=device))).long()
        self._scores: dict[Prefix, torch.Tensor] = {}
        self._states: dict[Prefix, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer: keys, values [1, h, L, d]

    def _keep(self, prefix: Prefix, logits: torch.Tensor, states: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._scores[prefix] = torch.log_softmax(logits.float(), dim=-1)
        self._states[prefix] = states

    @torch.no_grad()
    def _score_context(self) -> None:
        output = self.language_model(
            input_ids=self.context_ids, attention_mask=self.context_mask,
            position_ids=torch.arange(self.context_ids.shape[1], device=self.context_ids.device)[None],
            use_cache=True, logits_to_keep=1,
        )
        self._keep((), output.logits[0, -1], [(layer.keys, layer.values) for layer in output.past_key_values.layers])

    @torch.no_grad()
    def _score_children(self, prefixes: list[Prefix]) -> None:
        """Score `prefixes` (non-empty, parents already scored): each last token on its parent's keys and values."""
        device = self.context_ids.device
        offset = self.context_ids.shape[1]
        lengths = [offset + len(prefix) - 1 for prefix in prefixes]  # cached positions of each parent
        width = max(lengths)
        mask = torch.zeros((len(prefixes), width + 1), dtype=torch.long, device=device)
        for row, length in enumerate(lengths):  # left padding of the parents' caches
            mask[row, width - length : width - length + offset] = self.context_mask[0]
            mask[row, width - length + offset :] = 1
        layers = []
        for layer in range(len(self._states[()])):
            keys, values = [], []
            for prefix, length in zip(prefixes, lengths):
                key, value = self._states[prefix[:-1]][layer]
                pad = (0, 0, width - length, 0)
                keys.append(torch.nn.functional.pad(key, pad))
                values.append(torch.nn.functional.pad(value, pad))
            layers.append((torch.cat(keys), torch.cat(values)))
        output = self.language_model(
            input_ids=torch.tensor([[prefix[-1]] for prefix in prefixes], device=device),
            attention_mask=mask,
            position_ids=torch.tensor([[length] for length in lengths], device=device),
            past_key_values=DynamicCache(layers),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output.past_key_values.layers
        for row, (prefix, length) in enumerate(zip(prefixes, lengths)):
            start = width - length
            states = [(layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:]) for layer in cache]
            self._keep(prefix, output.logits[row, -1], states)

    def __call__(self, prefixes: Sequence[Prefix]) -> torch.Tensor:
        if () not in self._scores:
            self._score_context()
        missing = set()
        for prefix in prefixes:  # each prefix not scored yet, and its ancestors not scored yet
            while prefix not in self._scores and prefix not in missing:
                missing.add(prefix)
                prefix = prefix[:-1]
        for length in sorted({len(prefix) for prefix in missing}):  # parents before their children
            self._score_children([prefix for prefix in missing if len(prefix) == length])
        return torch.stack([self._scores[prefix] for prefix in prefixes])


def ctc_prefix_beam_search(
    log_probs: torch.Tensor,
    blank_id: int,
    beam_size: int,
    lm_weight: float = 0.0,
    next_token_log_probs: Callable[[Sequence[Prefix]], torch.Tensor] | None = None,
    end_token_id: int | None = None,
    length_bonus: float = 0.0,
) -> list[int]:
    """
    The best token sequence for CTC `log_probs` `[frames, V]` (log-softmax over the vocabulary, blank = `blank_id`):
    CTC prefix beam search keeping `beam_size` prefixes, each scored by its CTC log-probability (all alignments summed)
    plus `lm_weight` × its language-model log-probability (`next_token_log_probs`, see `LanguageModelPrefixScorer`),
    and at the end, with `end_token_id`, the language model's log-probability that the utterance ends there; plus
    `length_bonus` per token (it offsets the language model's cost of every word, which otherwise drops the words it
    finds unlikely, often the very ones the question is about). A frame
    extends prefixes by at most `beam_size` tokens, those within `CANDIDATE_LOG_PROB_MARGIN` of its best token.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
    if lm_weight and next_token_log_probs is None:
        raise ValueError("lm_weight needs next_token_log_probs (the language model's scorer).")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [frames, vocabulary], got shape {list(log_probs.shape)}.")
    use_lm = bool(lm_weight)
    log_probs = log_probs.float()
    # prefix → [log P(prefix, ending in blank), log P(prefix, ending in its last token)]
    beams: dict[Prefix, list[float]] = {(): [0.0, -math.inf]}
    lm_scores: dict[Prefix, float] = {(): 0.0}
    for frame in log_probs:
        best = float(frame.max())
        candidates = torch.nonzero(frame >= best - CANDIDATE_LOG_PROB_MARGIN).flatten()
        candidates = candidates[frame[candidates].argsort(descending=True)].tolist()
        tokens = [token for token in candidates if token != blank_id][:beam_size]
        blank = float(frame[blank_id])
        following: dict[Prefix, list[float]] = {}
        for prefix, (ends_blank, ends_token) in beams.items():
            entry = following.setdefault(prefix, [-math.inf, -math.inf])
            entry[0] = _log_add(entry[0], ends_blank + blank, ends_token + blank)
            for token in tokens:
                token_log_prob = float(frame[token])
                extended = prefix + (token,)
                grown = following.setdefault(extended, [-math.inf, -math.inf])
                if prefix and token == prefix[-1]:
                    # a repeat only counts as a new token after a blank; without one it stays the same token
                    entry[1] = _log_add(entry[1], ends_token + token_log_prob)
                    grown[1] = _log_add(grown[1], ends_blank + token_log_prob)
                else:
                    grown[1] = _log_add(grown[1], ends_blank + token_log_prob, ends_token + token_log_prob)
        new = [prefix for prefix in following if prefix not in lm_scores]
        if new:
            if use_lm:
                parents = [prefix[:-1] for prefix in new]
                scores = next_token_log_probs(parents)
                for row, prefix in enumerate(new):
                    lm_scores[prefix] = lm_scores[prefix[:-1]] + lm_weight * float(scores[row, prefix[-1]]) + length_bonus
            else:
                lm_scores.update({prefix: length_bonus * len(prefix) for prefix in new})
        ranked = sorted(following, key=lambda p: _log_add(*following[p]) + lm_scores[p], reverse=True)
        beams = {prefix: following[prefix] for prefix in ranked[:beam_size]}

    def final_score(prefix: Prefix) -> float:
        return _log_add(*beams[prefix]) + lm_scores[prefix]

    if use_lm and end_token_id is not None:
        finals = list(beams)
        ends = next_token_log_probs(finals)[:, end_token_id]
        return list(max(zip(finals, ends.tolist()), key=lambda item: final_score(item[0]) + lm_weight * item[1])[0])
    return list(max(beams, key=final_score))


__all__ = ["CANDIDATE_LOG_PROB_MARGIN", "LanguageModelPrefixScorer", "ctc_prefix_beam_search"]
