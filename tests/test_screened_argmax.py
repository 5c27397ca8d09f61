"""ScreenedArgmax: the CTC head's argmax from a bf16 screen plus fp32 checks equals the fp32 argmax."""

import torch
from torch import nn

from modeling_echox.model import speech_adapter
from modeling_echox.model.screened_argmax import ScreenedArgmax
from modeling_echox.testing.random_checkpoint import build_random_echox


def linear(vocab, width, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(width, vocab, bias=False)
    nn.init.normal_(layer.weight, std=0.1)
    return layer


def test_equals_the_fp32_argmax_on_random_rows():
    layer = linear(5000, 64, seed=0)
    inputs = torch.randn(3, 7, 64) * 4
    screened = ScreenedArgmax()(layer, inputs)
    assert screened.shape == (3, 7)
    assert screened.tolist() == layer(inputs).argmax(dim=-1).tolist()


def test_near_ties_that_bf16_orders_wrongly_are_settled_in_fp32():
    layer = linear(3000, 64, seed=1)
    base = layer.weight[100].detach().clone()
    inputs = base * 10 + 0.3 * torch.randn(40, 64)
    with torch.no_grad():  # 40 rows differing by less than bf16 resolves; the inputs all prefer one of them
        layer.weight[100:140] = base * 4 + 3e-3 * torch.randn(40, 64)
    expected = layer(inputs).argmax(dim=-1)
    rounded = (inputs.bfloat16() @ layer.weight.bfloat16().T).float()
    best_in_bf16 = rounded.gather(1, expected[:, None])[:, 0] == rounded.amax(dim=-1)
    assert not best_in_bf16.all()  # for some rows the bf16 product ranks another output strictly first
    assert ScreenedArgmax()(layer, inputs).tolist() == expected.tolist()


def test_follows_weight_changes():
    layer, screen, inputs = linear(500, 32, seed=2), ScreenedArgmax(), torch.randn(5, 32)
    before = screen(layer, inputs)
    with torch.no_grad():
        layer.weight[7] = inputs[0] * 10
    after = screen(layer, inputs)
    assert after[0] == 7 and before[0] != 7
    assert after.tolist() == layer(inputs).argmax(dim=-1).tolist()


def test_adapter_gives_the_same_speech_embeddings_without_ctc_logits(monkeypatch):
    monkeypatch.setattr(speech_adapter, "native_bf16_matmul", lambda: True)  # the screened path on any CPU
    model, _ = build_random_echox("tiny", seed=0)
    adapter = model.speech_adapter.eval()
    states = torch.randn(2, 40, model.config.audio_config.d_model)
    with torch.no_grad():
        full = adapter(states)
        frames = adapter.encode_frames(states)
        assert adapter.ctc_argmax(frames).tolist() == full.ctc_logits.argmax(dim=-1).tolist()
        lean = adapter(states, return_ctc_logits=False)
    assert lean.ctc_logits is None
    for a, b in zip(full.speech_embeddings, lean.speech_embeddings, strict=True):
        assert torch.equal(a, b)
