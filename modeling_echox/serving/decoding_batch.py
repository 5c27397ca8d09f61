"""The LLM side of the server: the answers being written, decoded together one token per step; rows come and go."""

import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList

from ..model.generation_configuration_echox import EchoXGenerationConfig
from .batch_cache import PaddedBatchCache, check_batchable


@dataclass(eq=False)
class DecodingRow:
    """One answer in the batch: the tokens it has been given so far (the last one is fed at the next step)."""

    tokens: list[int]
    position: int  # position id of the last token
    logits_processor: LogitsProcessorList
    do_sample: bool
    generated: torch.LongTensor = field(repr=False)  # `tokens` as `[1, n]`, what the logits processors read


class DecodingBatch:
    """
    Text decoding of a changing set of answers with one EchoX model, as `generate` decodes each of them alone.

    `add` prefills one request exactly as a lone `generate` call does (the kept prompt-prefix cache, then the rest of
    the prompt in one forward) and gives its first token; `step` runs one forward over every row (their caches
    left-padded into one batch, `PaddedBatchCache`) and gives each row its next token; `remove` takes rows out between
    steps. Each token comes with the final-layer state that produced it (the echo decoder's input). Tokens are chosen
    as transformers' sampling loop does: the request's logits processors, then argmax (greedy) or a draw (sampling).
    Greedy answers equal lone `generate`'s up to the floating-point effects of batching (none seen in the tests).
    """

    def __init__(self, model):
        self.model = model
        self.rows: list[DecodingRow] = []
        self._cache = PaddedBatchCache()
        check_batchable(DynamicCache(config=model.language_model.config))

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, inputs, generation_config: EchoXGenerationConfig) -> tuple[DecodingRow, int, torch.Tensor]:
        """
        Prefill one request (the processor's `input_ids`, `attention_mask`, `input_features` for one clip) and append
        it as a row. Returns the row, its first token and the state `[H]` that produced it.
        """
        model = self.model
        prompt = model._prepare_prompt(
            inputs["input_ids"], inputs["attention_mask"], inputs.get("input_features"), padding_side="left",
            return_ctc_logits=False,
        )
        cache = model.prompt_prefix_cache.seed(
            model.language_model, inputs["input_ids"], prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids,
            model.config.audio_token_id,
        )
        start = cache.get_seq_length() if cache is not None else 0
        outputs = model.language_model(
            inputs_embeds=prompt.inputs_embeds[:, start:],
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids[:, start:],
            past_key_values=cache if cache is not None else DynamicCache(config=model.language_model.config),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        config = copy.deepcopy(generation_config)  # `_prepare_special_tokens` writes tensors into it
        model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=prompt.inputs_embeds.device)
        row = DecodingRow(
            tokens=[],
            position=int(prompt.position_ids[0, -1]),
            logits_processor=model._get_logits_processor(
                generation_config=config, input_ids_seq_length=0, device=prompt.inputs_embeds.device, model_kwargs={}
            ),
            do_sample=bool(config.do_sample),
            generated=torch.zeros(1, 0, dtype=torch.long, device=prompt.inputs_embeds.device),
        )
        token = self._choose(row, outputs.logits[:, -1])
        self._cache.add(outputs.past_key_values, prompt.attention_mask)
        self.rows.append(row)
        return row, token, outputs.hidden_states[-1][0, -1]

    @torch.no_grad()
    def step(self) -> list[tuple[int, torch.Tensor]]:
        """One forward over every row (fed its last token): each row's next token and its producing state `[H]`."""
        device = self._cache.mask.device
        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=device)
        positions = torch.tensor([[row.position + 1] for row in self.rows], device=device)
        outputs = self.model.language_model(
            inputs_embeds=self.model.get_input_embeddings()(last),
            attention_mask=self._cache.next_mask(),
            position_ids=positions,
            past_key_values=self._cache.cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        chosen = []
        for index, row in enumerate(self.rows):
            row.position += 1
            chosen.append((self._choose(row, outputs.logits[index : index + 1, -1]), outputs.hidden_states[-1][index, -1]))
        return chosen

    def remove(self, rows: list[DecodingRow]) -> None:
        """Take these rows out of the batch."""
        indices = [index for index, row in enumerate(self.rows) if any(row is gone for gone in rows)]
        self._cache.remove(indices)
        self.rows = [row for index, row in enumerate(self.rows) if index not in indices]

    def clear(self) -> None:
        """Drop every row (after a failed step)."""
        self.remove(list(self.rows))

    @staticmethod
    def _choose(row: DecodingRow, logits: torch.Tensor) -> int:
        """The row's next token from its logits `[1, V]`, as transformers' sampling loop chooses it; recorded in the row."""
        scores = row.logits_processor(row.generated, logits.to(copy=True, dtype=torch.float32))
        if row.do_sample:
            token = int(torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        row.tokens.append(token)
        row.generated = torch.cat([row.generated, row.generated.new_tensor([[token]])], dim=1)
        return token
