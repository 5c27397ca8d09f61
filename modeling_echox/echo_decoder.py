"""The echo decoder: LLM hidden states of a text segment → unit-language tokens (EchoX's "Echo"/T2C decoder)."""

import torch
from torch import nn
from transformers import DynamicCache, LlamaModel


class EchoXEchoDecoder(nn.Module):
    """
    A small Llama decoder over a joint vocabulary: LLM text ids `[0, unit_token_offset)` followed by the unit-language
    tokens. Text ids are embedded with the LLM's output-embedding table (passed in, used frozen), unit tokens with
    `unit_embedding`; every input vector (text, unit or denoised hidden state) goes through `projection` into the
    decoder width. `denoiser` (the paper's denoising adapter) maps LLM hidden states towards the text table.

    Input layout of one segment: `prefix_ids` (+ the quirk id), `denoiser(h_segment)` (or the text embeddings of the
    segment's gold tokens when training text-to-codec), `suffix_ids`, then unit tokens up to `echo_eos_token_id`.
    """

    def __init__(self, config):
        super().__init__()
        hidden = config.text_config.hidden_size
        width = config.echo_config.hidden_size
        self.config = config
        self.denoiser = nn.Sequential(
            nn.Linear(hidden, config.denoiser_dim),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(config.denoiser_dim, hidden),
        )
        self.unit_embedding = nn.Embedding(config.unit_vocab_size, hidden)
        self.projection = nn.Linear(hidden, width)
        self.decoder = LlamaModel(config.echo_config)
        # Inputs always arrive as embeddings; the Llama's own token table would be dead weight.
        self.decoder.embed_tokens = None
        # Released: logits over the joint vocabulary. `echo_units_only_head`: over the unit tokens + the eos only.
        outputs = config.unit_vocab_size + 1 if config.echo_units_only_head else config.echo_vocab_size
        self.lm_head = nn.Linear(width, outputs, bias=False)

    def ids_from_logit_index(self, index: torch.LongTensor) -> torch.LongTensor:
        """Output-row indices of `lm_head` → joint-vocabulary ids (identity for the released joint head)."""
        if not self.config.echo_units_only_head:
            return index
        units = self.config.unit_vocab_size
        return torch.where(index < units, index + self.config.unit_token_offset, self.config.echo_eos_token_id)

    def logit_index_from_ids(self, ids: torch.LongTensor, ignore_index: int = -100) -> torch.LongTensor:
        """Joint-vocabulary target ids → output-row indices of `lm_head` (`ignore_index` is kept)."""
        if not self.config.echo_units_only_head:
            return ids
        offset, units = self.config.unit_token_offset, self.config.unit_vocab_size
        index = torch.where(ids == self.config.echo_eos_token_id, torch.full_like(ids, units), ids - offset)
        valid = (ids == self.config.echo_eos_token_id) | ((ids >= offset) & (ids < offset + units))
        if bool(((ids != ignore_index) & ~valid).any()):
            raise ValueError("Echo targets must be unit-language tokens or the echo eos with echo_units_only_head.")
        return torch.where(ids == ignore_index, ids, index)

    def embed_ids(self, ids: torch.LongTensor, text_table: torch.Tensor) -> torch.Tensor:
        """Embed joint-vocabulary ids into the LLM hidden space (before `projection`)."""
        offset = self.config.unit_token_offset
        is_unit = ids >= offset
        text = nn.functional.embedding(ids.clamp(max=offset - 1), text_table.detach())
        units = self.unit_embedding((ids - offset).clamp(min=0))
        return torch.where(is_unit[..., None], units.to(text.dtype), text)

    def segment_embeddings(self, segment: torch.Tensor, text_table: torch.Tensor, with_quirk_id: bool = True) -> torch.Tensor:
        """
        `[prefix; segment; suffix]` in the LLM hidden space for one segment `[n, H]` (already denoised or embedded).
        The released training code appended `echo_prefix_quirk_id` to every prefix but a response's first segment's;
        its inference appends it to all (`with_quirk_id=True`).
        """
        prefix = list(self.config.echo_prefix_ids)
        if with_quirk_id and self.config.echo_prefix_quirk_id is not None:
            prefix.append(self.config.echo_prefix_quirk_id)
        device = segment.device
        prefix = self.embed_ids(torch.tensor(prefix, device=device), text_table)
        suffix = self.embed_ids(torch.tensor(list(self.config.echo_suffix_ids), device=device), text_table)
        return torch.cat([prefix, segment.to(prefix.dtype), suffix])

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        """Run the decoder on LLM-space embeddings `[B, L, H]`; returns `(logits [B, L, V+U or U+1], past_key_values)`."""
        outputs = self.decoder(
            inputs_embeds=self.projection(inputs_embeds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return self.lm_head(outputs.last_hidden_state), outputs.past_key_values

    @torch.no_grad()
    def generate(
        self,
        segments: list[torch.Tensor],
        text_table: torch.Tensor,
        max_new_tokens: int | None = None,
        denoise: bool = True,
        quirk_flags: list[bool] | None = None,
    ):
        """
        Greedy decoding (as released) of every segment's unit-language tokens, all segments in one left-padded batch.

        Args:
            segments: LLM hidden states `[n_i, H]` of each segment (the denoiser is applied here).
            text_table: the LLM output-embedding table `[V, H]`.
            max_new_tokens: default `echo_max_new_tokens` of the config.
            denoise: `False` when `segments` already are text-table embeddings of text ids (text-to-codec use, as in
                stage II training and when a frozen stage-II model labels text for stage III): no denoiser.
            quirk_flags: per segment, whether its prefix gets `echo_prefix_quirk_id` (default: all, as released
                inference does; training used it on every segment of a response but the first).
        Returns:
            One list of generated joint-vocabulary ids per segment, without the final eos.
        """
        if not segments:
            return []
        max_new_tokens = max_new_tokens or self.config.echo_max_new_tokens
        eos = self.config.echo_eos_token_id
        quirk_flags = [True] * len(segments) if quirk_flags is None else list(quirk_flags)
        prompts = [
            self.segment_embeddings(self.denoiser(s) if denoise else s, text_table, with_quirk_id=quirk)
            for s, quirk in zip(segments, quirk_flags, strict=True)
        ]
        length = max(prompt.shape[0] for prompt in prompts)
        device = prompts[0].device
        inputs = torch.stack([nn.functional.pad(p, (0, 0, length - p.shape[0], 0)) for p in prompts])
        mask = torch.stack([torch.arange(length, device=device) >= length - p.shape[0] for p in prompts]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config.echo_config)
        generated = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits, cache = self(inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            next_ids = self.ids_from_logit_index(logits[:, -1].argmax(dim=-1)).masked_fill(finished, eos)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            finished |= next_ids == eos
            if finished.all():
                break
            inputs = self.embed_ids(next_ids[:, None], text_table)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        results = []
        for row in generated.tolist():
            results.append(row[: row.index(eos)] if eos in row else row)
        return results
