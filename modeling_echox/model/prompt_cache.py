"""The LLM's key/value cache of the fixed text in front of the speech (system prompt, template head), kept across requests."""

import copy

import torch


class PromptPrefixCache:
    """
    Every spoken request starts with the same tokens: the system prompt and the chat template up to the `<audio>`
    placeholder. Their keys and values do not depend on the speech, so they are computed once and a copy seeds each
    `generate` call; only the speech embeddings and the text after them are prefilled per request.

    The stored cache is keyed by the prefix ids and by the identity and version counter of every LLM weight, so any
    change of the weights (training steps, `load_state_dict`, merging a LoRA) recomputes it.
    """

    def __init__(self):
        self._key = None
        self._cache = None

    @staticmethod
    def _weights_key(language_model) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in language_model.parameters())

    @torch.no_grad()
    def seed(self, language_model, input_ids, inputs_embeds, attention_mask, position_ids, audio_token_id: int):
        """
        A fresh cache holding the prompt's tokens before the first `<audio>`, or `None` when the prompt does not fit
        (more than one row, no speech, or no text in front of it). Arguments are those of the prefill: `input_ids`
        `[1, T]` as the processor made them, the rest after the speech was spliced in (so masked prompt eots stay
        masked).
        """
        if input_ids.shape[0] != 1:
            return None
        placeholders = torch.nonzero(input_ids[0] == audio_token_id).flatten()
        if len(placeholders) == 0 or int(placeholders[0]) == 0:
            return None
        length = int(placeholders[0])
        key = (tuple(input_ids[0, :length].tolist()), self._weights_key(language_model))
        if key != self._key:
            outputs = language_model(
                inputs_embeds=inputs_embeds[:, :length],
                attention_mask=attention_mask[:, :length],
                position_ids=position_ids[:, :length],
                use_cache=True,
                logits_to_keep=1,
            )
            self._key, self._cache = key, outputs.past_key_values
        return copy.deepcopy(self._cache)
