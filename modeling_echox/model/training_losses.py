"""
The training losses of `EchoXForSpeechToSpeech` (`EchoXTrainingLossesMixin`): the adapter's CTC loss (stage I), the
echo decoder's loss on gold-text segments (stage II) or on the LLM's denoised hidden states (stage III), and the
denoising loss.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .speech_prompt import IGNORE_INDEX


class EchoXTrainingLossesMixin:
    """Losses and training segments for `EchoXForSpeechToSpeech.forward`."""

    def _ctc_loss(self, ctc_logits, ctc_labels, ctc_lengths=None):
        """CTC of the adapter's head against transcript ids (`-100` padded); blank = `<audio>`, as released."""
        if ctc_labels.shape[0] != ctc_logits.shape[0]:
            raise ValueError(f"ctc_labels has {ctc_labels.shape[0]} rows but the batch has {ctc_logits.shape[0]} audio clips.")
        valid = ctc_labels != IGNORE_INDEX
        log_probs = nn.functional.log_softmax(ctc_logits.float(), dim=-1).transpose(0, 1)
        input_lengths = (
            ctc_lengths.to(torch.long).cpu()
            if ctc_lengths is not None
            else torch.full((ctc_logits.shape[0],), ctc_logits.shape[1], dtype=torch.long)
        )
        return nn.functional.ctc_loss(
            log_probs,
            ctc_labels.masked_fill(~valid, 0),
            input_lengths,
            valid.sum(-1),
            blank=self.config.audio_token_id,
            reduction="mean",
            zero_infinity=True,
        )

    def _echo_loss(self, segments, unit_labels, quirk_flags, token_ids):
        """
        Teacher-forced echo-decoder CE (the CTC decoder: its CTC loss). `segments`: LLM-space vectors `[n_i, H]` of
        each segment; `unit_labels`: its target ids (joint vocabulary, ending with the echo eos); `token_ids`: the
        text ids of its positions.
        """
        if self.echo_decoder.reads_once:
            return self.echo_decoder.ctc_loss(segments, unit_labels, token_ids)
        table = self.text_table
        rows, targets = [], []
        for segment, target, with_quirk, ids in zip(segments, unit_labels, quirk_flags, token_ids, strict=True):
            prompt = self.echo_decoder.segment_embeddings(segment, table, with_quirk_id=with_quirk, token_ids=ids)
            rows.append(torch.cat([prompt, self.echo_decoder.embed_ids(target[:-1], table)]))
            targets.append(torch.cat([target.new_full((prompt.shape[0] - 1,), IGNORE_INDEX), target]))
        inputs = pad_sequence(rows, batch_first=True)
        labels = pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX)
        mask = pad_sequence([torch.ones(row.shape[0], dtype=torch.long, device=inputs.device) for row in rows], batch_first=True)
        logits, _ = self.echo_decoder(inputs, attention_mask=mask)
        labels = self.echo_decoder.logit_index_from_ids(labels, IGNORE_INDEX)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    @staticmethod
    def _split_segments(lengths_row, total):
        """Token spans from one row of `echo_segment_lengths` (0 = no segment)."""
        spans, start = [], 0
        for length in lengths_row.tolist():
            if length <= 0:
                continue
            if start + length > total:
                raise ValueError(f"echo_segment_lengths add up to more than the {total} response tokens of the sample.")
            spans.append((start, start + length))
            start += length
        return spans

    def _text_to_codec_segments(self, echo_text_ids, unit_labels):
        """Stage II: segments are the text-table embeddings of gold text; `echo_text_ids` `[B, S, Lt]`, -100 padded."""
        table = self.text_table.detach()
        segments, labels, quirks, token_ids = [], [], [], []
        for sample_text, sample_units in zip(echo_text_ids, unit_labels):
            for index, (text, units) in enumerate(zip(sample_text, sample_units)):
                text = text[text != IGNORE_INDEX]
                if text.numel() == 0:
                    continue
                segments.append(nn.functional.embedding(text, table))
                labels.append(units[units != IGNORE_INDEX])
                quirks.append(index > 0)
                token_ids.append(text)
        return segments, labels, quirks, token_ids

    def _echo_segments(self, hidden_states, labels, unit_labels, echo_segment_lengths):
        """
        Stage III: the denoised LLM hidden states that produced each response token, cut into segments, and the
        denoising loss (1 - cos to the text-table row of the gold token, summed over tokens, averaged over samples).
        Also returns each segment's token ids.
        """
        table = self.text_table.detach()
        producing = labels[:, 1:] != IGNORE_INDEX
        segments, targets, quirks, token_ids, denoise = [], [], [], [], []
        for row in range(labels.shape[0]):
            states = hidden_states[row, :-1][producing[row]]
            gold = labels[row, 1:][producing[row]]
            if echo_segment_lengths is None:
                spans = [(0, states.shape[0] - 1)]  # the whole response but its final eot, like inference
            else:
                spans = self._split_segments(echo_segment_lengths[row], states.shape[0])
            denoised = self.echo_decoder.denoiser(states)
            used = max(end for _, end in spans)
            cosine = nn.functional.cosine_similarity(denoised[:used].float(), table[gold[:used]].float(), dim=-1)
            denoise.append((1 - cosine).sum())
            for index, (start, end) in enumerate(spans):
                units = unit_labels[row, index]
                segments.append(denoised[start:end])
                targets.append(units[units != IGNORE_INDEX])
                quirks.append(index > 0)
                token_ids.append(gold[start:end])
        return segments, targets, quirks, token_ids, torch.stack(denoise).mean()
