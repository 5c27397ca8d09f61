"""The speech adapter: Whisper encoder frames → a short sequence of LLM-space speech embeddings (Soundwave/EchoX)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .screened_argmax import ScreenedArgmax, native_bf16_matmul


@dataclass
class SpeechAdapterOutput:
    """
    speech_embeddings: one `[v_i, H]` tensor per clip, the vectors that replace its `<audio>` placeholder.
    ctc_logits: `[num_clips, frames, V]` logits of the CTC head over the LLM vocabulary (blank = `<audio>`); None when
        they were not asked for (only their argmax was needed).
    ctc_lengths: adapter frames of each clip when clips were cropped to their own length (rows of `ctc_logits` are
        zero-padded after it), else None (every clip has all `frames`).
    dictation: with `adapter_output="dictation"`, the LLM token ids each clip's speech embeddings embed; else None.
    """

    speech_embeddings: list[torch.Tensor]
    ctc_logits: torch.Tensor | None
    ctc_lengths: torch.LongTensor | None = None
    dictation: list[torch.LongTensor] | None = None


class EchoXSpeechAdapter(nn.Module):
    """
    Stack `adapter_frame_stack` encoder frames → `projector` → `frame_block` (one pre-norm transformer layer) →
    `out_norm` → `ctc_head`. The CTC argmax then shrinks the sequence: of each run of frames with the same argmax only
    the first is kept (blank runs too). With `adapter_output="look_back"` (released) the kept frames attend back over
    the kept frames (`look_back`, residual, `look_back_norm`); their outputs are the speech embeddings. With
    `"dictation"` the kept non-blank frames' argmax ids are the clip's dictation (or the ids a `dictate` search finds
    in the CTC log-probabilities, `modeling_echox.model.dictation_search`), and the speech embeddings are the LLM's
    input embeddings of those ids (`token_embedding`, passed to `forward`). Without gradients and without
    `return_ctc_logits`, the argmax comes from `ScreenedArgmax` on CPUs with native bf16 products (same ids, about 3×
    faster).
    """

    def __init__(self, config):
        super().__init__()
        audio_dim = config.audio_config.d_model
        hidden = config.text_config.hidden_size
        self.config = config
        self.frame_stack = config.adapter_frame_stack
        self.blank_id = config.audio_token_id
        self.per_frame_block = config.adapter_per_frame_block
        self.projector = nn.Linear(audio_dim * self.frame_stack, hidden)
        self.frame_block = nn.TransformerEncoderLayer(
            d_model=hidden,
            nhead=config.adapter_heads,
            dim_feedforward=config.adapter_ffn_dim,
            dropout=config.adapter_dropout,
            norm_first=True,
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.ctc_head = nn.Linear(hidden, config.text_config.vocab_size, bias=False)
        self.look_back = nn.MultiheadAttention(
            hidden, config.adapter_heads, dropout=config.adapter_dropout, batch_first=True
        )
        self.look_back_norm = nn.LayerNorm(hidden)
        self._screened_argmax = ScreenedArgmax()

    @property
    def output(self) -> str:
        """The speech interface, read from the model's config (`adapter_output`), so switching it there switches it."""
        return self.config.adapter_output

    def encode_frames(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """`[N, T, D]` encoder states → `[N, T / stack, H]` normalized adapter frames."""
        num_clips, num_frames, dim = encoder_states.shape
        if num_frames % self.frame_stack:
            raise ValueError(
                f"The speech encoder returned {num_frames} frames, not a multiple of adapter_frame_stack={self.frame_stack}."
            )
        frames = encoder_states.reshape(num_clips, num_frames // self.frame_stack, dim * self.frame_stack)
        frames = self.projector(frames)
        if self.per_frame_block:
            # The released model feeds [1, T, H] to a sequence-first layer: a sequence of length 1 per frame, so
            # attention never mixes frames. Every frame of every clip is one "batch" row here, which is the same.
            frames = self.frame_block(frames.reshape(1, -1, frames.shape[-1])).reshape(frames.shape)
        else:
            frames = self.frame_block(frames.transpose(0, 1)).transpose(0, 1)
        return self.out_norm(frames)

    def ctc_argmax(self, frames: torch.Tensor) -> torch.LongTensor:
        """`[N, T]` CTC head argmax ids of adapter frames `[N, T, H]`, without the full fp32 logits where it can."""
        head = self.ctc_head
        screen = (
            not torch.is_grad_enabled()
            and type(head) is nn.Linear
            and head.bias is None
            and head.weight.dtype == torch.float32
            and head.weight.device.type == "cpu"
            and native_bf16_matmul()
        )
        return self._screened_argmax(head, frames) if screen else head(frames).argmax(dim=-1)

    @staticmethod
    def run_starts(tokens: torch.LongTensor) -> torch.BoolTensor:
        """`[N, T]` mask of the frames that start a run of equal CTC argmax ids `tokens` (frame 0 always)."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        keep[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
        return keep

    def forward(
        self,
        encoder_states: torch.Tensor,
        frame_counts: list[int] | None = None,
        return_ctc_logits: bool = True,
        token_embedding: nn.Module | None = None,
        dictate: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
    ) -> SpeechAdapterOutput:
        """
        `frame_counts`: encoder frames to use per clip (multiples of the frame stack); default: all of them.
        `return_ctc_logits=False` (inference): only the argmax of the CTC head is computed; `ctc_logits` is None.
        `token_embedding`: the LLM's input embedding table; needed (and only read) with `adapter_output="dictation"`.
        `dictate(clip, log_probs)`: with `adapter_output="dictation"`, the dictation of clip number `clip` from its CTC
            log-probabilities `[frames, V]` (e.g. `ctc_prefix_beam_search`); default: the greedy argmax.
        """
        if self.output == "dictation" and token_embedding is None:
            raise ValueError("adapter_output='dictation' embeds the adapter's dictation with the LLM's input embedding "
                             "table: pass token_embedding.")
        if dictate is not None and self.output != "dictation":
            raise ValueError(f"A dictation search only applies to adapter_output='dictation', not {self.output!r}.")
        if frame_counts is not None:
            clips = [
                self(encoder_states[i : i + 1, :count], None, return_ctc_logits, token_embedding,
                     None if dictate is None else lambda _, log_probs, clip=i: dictate(clip, log_probs))
                for i, count in enumerate(frame_counts)
            ]
            logits = [clip.ctc_logits[0] for clip in clips] if return_ctc_logits else None
            return SpeechAdapterOutput(
                speech_embeddings=[clip.speech_embeddings[0] for clip in clips],
                ctc_logits=pad_sequence(logits, batch_first=True) if logits else None,
                ctc_lengths=torch.tensor([len(clip) for clip in logits], device=encoder_states.device) if logits else None,
                dictation=[clip.dictation[0] for clip in clips] if self.output == "dictation" else None,
            )
        frames = self.encode_frames(encoder_states)
        ctc_logits = self.ctc_head(frames) if return_ctc_logits or dictate is not None else None
        if self.output == "dictation" and dictate is not None:
            log_probs = torch.log_softmax(ctc_logits.float(), dim=-1)
            dictation = [
                torch.tensor(list(dictate(clip, clip_log_probs)), dtype=torch.long, device=frames.device)
                for clip, clip_log_probs in enumerate(log_probs)
            ]
            return SpeechAdapterOutput(speech_embeddings=[token_embedding(ids) for ids in dictation],
                                       ctc_logits=ctc_logits if return_ctc_logits else None, dictation=dictation)
        tokens = ctc_logits.argmax(dim=-1) if return_ctc_logits else self.ctc_argmax(frames)
        keep = self.run_starts(tokens)
        if self.output == "dictation":
            spoken = keep & (tokens != self.blank_id)
            dictation = [clip_tokens[clip_spoken] for clip_tokens, clip_spoken in zip(tokens, spoken)]
            return SpeechAdapterOutput(speech_embeddings=[token_embedding(ids) for ids in dictation],
                                       ctc_logits=ctc_logits, dictation=dictation)
        lengths = keep.sum(dim=-1)
        queries = pad_sequence([clip_frames[clip_keep] for clip_frames, clip_keep in zip(frames, keep)], batch_first=True)
        attended, _ = self.look_back(queries, frames, frames, key_padding_mask=~keep, need_weights=False)
        speech = self.look_back_norm(queries + attended)
        return SpeechAdapterOutput(
            speech_embeddings=[speech[clip, : lengths[clip]] for clip in range(frames.shape[0])],
            ctc_logits=ctc_logits,
        )
