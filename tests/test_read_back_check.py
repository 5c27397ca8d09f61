"""The echo decoder read-back check (training/read_back_check.py) on a tiny random checkpoint, ASR stubbed."""

import json

import numpy as np
import pytest
import torch

from modeling_echox.testing.random_checkpoint import build_random_echox
from training import read_back_check as check


class _FixedTranscriber:
    def __init__(self, transcript):
        self.transcript, self.calls = transcript, []

    def __call__(self, audio):
        self.calls.append(audio)
        return self.transcript


def test_read_texts_takes_each_distinct_text_once(tmp_path):
    path = tmp_path / "texts.jsonl"
    lines = [{"answer_text": "the cat sat"}, {"text": "a dog"}, {"answer_text": "the cat sat"}, {"response": " "}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert check.read_texts(str(path)) == ["the cat sat", "a dog"]
    assert check.read_texts(str(path), limit=1) == ["the cat sat"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"answers": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="no text field"):
        check.read_texts(str(tmp_path / "bad.jsonl"))


class _UnitsOnly(torch.nn.Module):
    """The random echo decoder's head restricted to unit tokens, so that every text is read as units."""

    def __init__(self, head, offset):
        super().__init__()
        self.head, self.offset = head, offset

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., : self.offset] = float("-inf")
        return logits


def test_batched_read_back_equals_reading_one_text_at_a_time():
    model, processor = build_random_echox("tiny", seed=3)
    model.echo_decoder.lm_head = _UnitsOnly(model.echo_decoder.lm_head, model.config.unit_token_offset)
    texts = ["the cat sat on the mat", "a dog", "seven plus three is ten"]
    batched = check.read_back(model, processor.tokenizer, texts, batch_size=3)
    alone = [check.read_back(model, processor.tokenizer, [text])[0] for text in texts]
    assert len(batched) == 3 and all(w.numel() for w in batched)
    for one, other in zip(batched, alone):
        assert one.dim() == 1 and one.shape == other.shape
        torch.testing.assert_close(one, other, atol=1e-4, rtol=1e-4)


def test_check_scores_transcripts_against_the_texts(tmp_path, monkeypatch):
    model, processor = build_random_echox("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    voiced = [torch.zeros(1600), torch.zeros(0), torch.ones(800)]  # the second text gets no units
    monkeypatch.setattr(check, "read_back", lambda model, tokenizer, texts, batch_size: voiced)
    transcriber = _FixedTranscriber("The cat sat.")
    result = check.read_back_check(str(tmp_path / "ckpt"), ["the cat sat", "a dog", "seven is 7"], transcriber)
    assert len(transcriber.calls) == 2 and all(call.dtype == np.float32 for call in transcriber.calls)
    errors = [item["errors"] for item in result["items"]]
    assert errors == [0, 2, 3]  # right; nothing said; "the cat sat" for "seven is seven"
    assert result["n_reference_words"] == 8 and result["wer"] == pytest.approx(5 / 8)
    assert result["texts_fully_right"] == pytest.approx(1 / 3)
