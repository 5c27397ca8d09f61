"""The echo decoder: LLM hidden states of a text segment → unit-language tokens (EchoX's "Echo"/T2C decoder)."""

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, LlamaModel


class EchoXEchoDecoder(nn.Module):
    """
    A small Llama decoder over a joint vocabulary: LLM text ids `[0, unit_token_offset)` followed by the unit-language
    tokens. Text ids are embedded with the LLM's output-embedding table (passed in, used frozen), unit tokens with
    `unit_embedding`; every input vector (text, unit or denoised hidden state) goes through `projection` into the
    decoder width. `denoiser` (the paper's denoising adapter) maps LLM hidden states towards the text table.

    Its settings are `config.echo_config` (an `EchoXEchoDecoderConfig`). Input layout of one segment: `prefix_ids` (+ the
    quirk id), `denoiser(h_segment)` (or the text embeddings of the segment's gold tokens when training text-to-codec),
    `suffix_ids`, then unit tokens up to `unit_eos_token_id`.

    With `spelling_length` > 0 (not in the released model), each segment token is spelled out: one input position
    per byte of its lowercase text (`token_spelling`, see `set_token_spelling`), holding the token's vector plus the
    byte's embedding (`byte_embedding`), so words the decoder never heard still come with their letters.

    With `decoder_type="ctc"` (not in the released model) the decoder reads a segment once instead of writing
    after it: the segment's positions only (no prefix or suffix), each repeated `ctc_upsample` times (plus
    `upsample_embedding` of its copy index), attend to each other both ways, and each gives a unit token or the blank.
    """

    def __init__(self, config):
        super().__init__()
        hidden = config.text_config.hidden_size
        echo = config.echo_config
        width = echo.hidden_size
        self.config = config
        self.denoiser = nn.Sequential(
            nn.Linear(hidden, config.denoiser_dim),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(config.denoiser_dim, hidden),
        )
        self.reads_once = echo.decoder_type == "ctc"
        if self.reads_once:
            self.upsample_embedding = nn.Embedding(echo.ctc_upsample, width)
        else:
            self.unit_embedding = nn.Embedding(config.unit_vocab_size, hidden)
        self.projection = nn.Linear(hidden, width)
        self.decoder = LlamaModel(echo)
        # Inputs always arrive as embeddings; the Llama's own token table would be dead weight.
        self.decoder.embed_tokens = None
        # Released: logits over the joint vocabulary. `units_only_head`: over the unit tokens + the eos only.
        outputs = config.unit_vocab_size + 1 if echo.units_only_head else config.echo_vocab_size
        self.lm_head = nn.Linear(width, outputs, bias=False)
        if echo.spelling_length:
            self.byte_embedding = nn.Embedding(256, hidden)
            self.register_buffer(
                "token_spelling",
                torch.zeros(config.text_config.vocab_size, echo.spelling_length, dtype=torch.uint8),
            )

    @property
    def spells(self) -> bool:
        return bool(self.config.echo_config.spelling_length)

    def set_token_spelling(self, tokenizer) -> None:
        """Fill `token_spelling` from the LLM's tokenizer: each id's lowercase UTF-8 text, cut to `spelling_length`
        bytes (special tokens: none)."""
        if not self.spells:
            raise ValueError("set_token_spelling needs an echo_config with spelling_length > 0.")
        length = self.config.echo_config.spelling_length
        special = set(tokenizer.all_special_ids)
        table = torch.zeros_like(self.token_spelling)
        for index in range(min(len(tokenizer), table.shape[0])):
            if index in special:
                continue
            text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(index)])
            spelled = text.lower().encode("utf-8")[:length]
            if spelled:
                table[index, : len(spelled)] = torch.tensor(list(spelled), dtype=torch.uint8)
        self.token_spelling.copy_(table.to(self.token_spelling.device))

    def spell(self, vectors: torch.Tensor, token_ids: torch.LongTensor) -> torch.Tensor:
        """`[n, H]` vectors of the tokens `token_ids` `[n]` → `[m, H]`: one row per byte of each token's spelling (its
        vector + the byte's embedding), in order; a token with no bytes keeps its one row."""
        if token_ids is None or token_ids.shape[0] != vectors.shape[0]:
            raise ValueError("A spelling echo decoder needs the token ids of every segment position.")
        if not bool(self.token_spelling.any()):
            raise ValueError("The echo decoder's token_spelling table is empty: call set_token_spelling(tokenizer).")
        spelling = self.token_spelling[token_ids].long()
        has_byte = spelling > 0
        keep = torch.arange(spelling.shape[1], device=spelling.device) < has_byte.sum(-1, keepdim=True).clamp(min=1)
        rows = vectors[:, None, :] + self.byte_embedding(spelling).to(vectors.dtype) * has_byte[..., None]
        return rows[keep]

    def read_positions(self, segment: torch.Tensor, token_ids: torch.LongTensor | None) -> torch.Tensor:
        """The decoder's input positions for one segment `[n, H]`: spelled out (`spell`) when it spells, else as is."""
        return self.spell(segment, token_ids) if self.spells else segment

    def ids_from_logit_index(self, index: torch.LongTensor) -> torch.LongTensor:
        """Output-row indices of `lm_head` → joint-vocabulary ids (identity for the released joint head)."""
        if not self.config.echo_config.units_only_head:
            return index
        units = self.config.unit_vocab_size
        return torch.where(index < units, index + self.config.unit_token_offset, self.config.echo_config.unit_eos_token_id)

    def logit_index_from_ids(self, ids: torch.LongTensor, ignore_index: int = -100) -> torch.LongTensor:
        """Joint-vocabulary target ids → output-row indices of `lm_head` (`ignore_index` is kept)."""
        if not self.config.echo_config.units_only_head:
            return ids
        offset, units, eos = self.config.unit_token_offset, self.config.unit_vocab_size, self.config.echo_config.unit_eos_token_id
        index = torch.where(ids == eos, torch.full_like(ids, units), ids - offset)
        valid = (ids == eos) | ((ids >= offset) & (ids < offset + units))
        if bool(((ids != ignore_index) & ~valid).any()):
            raise ValueError("Echo targets must be unit-language tokens or the echo eos with a units-only head.")
        return torch.where(ids == ignore_index, ids, index)

    def ctc_logits(self, segments: list[torch.Tensor]) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        CTC decoder: the LLM-space inputs of each segment `[n_i, H]` (denoised or embedded, and spelled) → logits
        `[B, T, U + 1]` over the unit tokens and the blank (last row), and each row's length `n_i * ctc_upsample`.
        """
        upsample = self.config.echo_config.ctc_upsample
        rows = [
            self.projection(segment).repeat_interleave(upsample, dim=0)
            + self.upsample_embedding.weight.repeat(segment.shape[0], 1).to(segment.dtype)
            for segment in segments
        ]
        device = rows[0].device
        lengths = torch.tensor([row.shape[0] for row in rows], device=device)
        inputs = pad_sequence(rows, batch_first=True)
        width = inputs.shape[1]
        real = torch.arange(width, device=device)[None] < lengths[:, None]
        # Every position attends to every real position of its row, before and after it (a 4D mask is used as given).
        mask = torch.zeros(real.shape, dtype=inputs.dtype, device=device).masked_fill(~real, torch.finfo(inputs.dtype).min)
        mask = mask[:, None, None, :].expand(-1, 1, width, -1)
        positions = torch.arange(width, device=device).expand(len(rows), -1)
        hidden = self.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state
        return self.lm_head(hidden), lengths

    def ctc_loss(
        self, segments: list[torch.Tensor], targets: list[torch.LongTensor], token_ids: list[torch.LongTensor | None]
    ) -> torch.Tensor:
        """
        CTC loss of the CTC decoder: `segments` `[n_i, H]` (denoised or embedded) with their text ids `token_ids`,
        `targets` their joint-vocabulary ids (an eos is dropped).
        """
        inputs = [self.read_positions(s, ids) for s, ids in zip(segments, token_ids, strict=True)]
        logits, lengths = self.ctc_logits(inputs)
        eos = self.config.echo_config.unit_eos_token_id
        labels = [self.logit_index_from_ids(target[target != eos]) for target in targets]
        log_probs = nn.functional.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        return nn.functional.ctc_loss(
            log_probs,
            torch.cat(labels),
            lengths.cpu(),
            torch.tensor([len(label) for label in labels]),
            blank=self.config.unit_vocab_size,
            reduction="mean",
            zero_infinity=True,
        )

    def ctc_decode(self, segments: list[torch.Tensor], token_ids: list[torch.LongTensor | None]) -> list[list[int]]:
        """
        Greedy CTC decoding of `segments` `[n_i, H]` (denoised or embedded) with their text ids: each frame's best row,
        repeats merged, blanks dropped → joint-vocabulary ids per segment.
        """
        inputs = [self.read_positions(s, ids) for s, ids in zip(segments, token_ids, strict=True)]
        logits, lengths = self.ctc_logits(inputs)
        blank = self.config.unit_vocab_size
        results = []
        for best, length in zip(logits.argmax(dim=-1), lengths.tolist()):
            path = best[:length]
            first_of_run = torch.ones_like(path, dtype=torch.bool)
            first_of_run[1:] = path[1:] != path[:-1]
            results.append(self.ids_from_logit_index(path[first_of_run & (path != blank)]).tolist())
        return results

    def embed_ids(self, ids: torch.LongTensor, text_table: torch.Tensor) -> torch.Tensor:
        """Embed joint-vocabulary ids into the LLM hidden space (before `projection`)."""
        offset = self.config.unit_token_offset
        is_unit = ids >= offset
        text = nn.functional.embedding(ids.clamp(max=offset - 1), text_table.detach())
        units = self.unit_embedding((ids - offset).clamp(min=0))
        return torch.where(is_unit[..., None], units.to(text.dtype), text)

    def segment_embeddings(
        self,
        segment: torch.Tensor,
        text_table: torch.Tensor,
        with_quirk_id: bool = True,
        token_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """
        `[prefix; segment; suffix]` in the LLM hidden space for one segment `[n, H]` (already denoised or embedded;
        spelled out when the decoder spells, which needs the segment's `token_ids` `[n]`).
        The released training code appended `prefix_quirk_id` to every prefix but a response's first segment's;
        its inference appends it to all (`with_quirk_id=True`).
        """
        echo = self.config.echo_config
        segment = self.read_positions(segment, token_ids)
        prefix = list(echo.prefix_ids)
        if with_quirk_id and echo.prefix_quirk_id is not None:
            prefix.append(echo.prefix_quirk_id)
        device = segment.device
        prefix = self.embed_ids(torch.tensor(prefix, device=device), text_table)
        suffix = self.embed_ids(torch.tensor(list(echo.suffix_ids), device=device), text_table)
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
        token_ids: list[torch.LongTensor] | None = None,
    ):
        """
        Greedy decoding (as released) of every segment's unit-language tokens, all segments in one left-padded batch
        (the CTC decoder: one pass over all segments, `ctc_decode`).

        Args:
            segments: LLM hidden states `[n_i, H]` of each segment (the denoiser is applied here).
            text_table: the LLM output-embedding table `[V, H]`.
            max_new_tokens: most tokens written per segment (`None`: the autoregressive decoder writes until its eos
                or its last position, `max_position_embeddings`; the CTC decoder's output is not cut). The model passes
                its generation config's `echo_max_new_tokens`.
            denoise: `False` when `segments` already are text-table embeddings of text ids (text-to-codec use, as in
                stage II training and when a frozen stage-II model labels text for stage III): no denoiser.
            quirk_flags: per segment, whether its prefix gets `prefix_quirk_id` (default: all, as released
                inference does; training used it on every segment of a response but the first).
            token_ids: the text ids of each segment's positions (needed when the decoder spells, `spelling_length`).
        Returns:
            One list of generated joint-vocabulary ids per segment, without the final eos.
        """
        if not segments:
            return []
        eos = self.config.echo_config.unit_eos_token_id
        quirk_flags = [True] * len(segments) if quirk_flags is None else list(quirk_flags)
        token_ids = [None] * len(segments) if token_ids is None else list(token_ids)
        if self.reads_once:
            inputs = [self.denoiser(s) if denoise else s for s in segments]
            return [ids[:max_new_tokens] for ids in self.ctc_decode(inputs, token_ids)]  # [:None] keeps all
        prompts = [
            self.segment_embeddings(self.denoiser(s) if denoise else s, text_table, with_quirk_id=quirk, token_ids=ids)
            for s, quirk, ids in zip(segments, quirk_flags, token_ids, strict=True)
        ]
        length = max(prompt.shape[0] for prompt in prompts)
        if max_new_tokens is None:
            max_new_tokens = max(self.config.echo_config.max_position_embeddings - length, 1)
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
