"""
The CTC echo decoder (`echo_decoder_type="ctc"`): one bidirectional pass per segment, CTC loss, greedy collapse
(its streaming and saving: tests/test_echo_spelling.py).
"""

import pytest
import torch

from modeling_echox import EchoXConfig, EchoXForSpeechToSpeech
from modeling_echox.testing.random_checkpoint import build_random_echox


@pytest.fixture(scope="module")
def ctc():
    return build_random_echox("tiny", seed=0, echo_spelling_length=6, echo_decoder_type="ctc")


def _segments(model, tokenizer, texts):
    ids = [torch.tensor(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    return [model.text_table[i].detach() for i in ids], ids


def test_ctc_needs_the_units_only_head():
    config = build_random_echox("tiny", seed=0)[0].config.to_dict()
    config["echo_config"].update(decoder_type="ctc", units_only_head=False)
    with pytest.raises(ValueError, match="units_only_head"):
        EchoXConfig(**config)


def test_greedy_decoding_merges_repeats_and_drops_blanks(ctc, monkeypatch):
    model, processor = ctc
    decoder, config = model.echo_decoder, model.config
    blank, offset = config.unit_vocab_size, config.unit_token_offset
    path = [blank, 3, 3, blank, 3, 7, 7, 7, blank, 1]
    logits = torch.nn.functional.one_hot(torch.tensor([path]), blank + 1).float()
    monkeypatch.setattr(decoder, "ctc_logits", lambda segments: (logits, torch.tensor([len(path) - 1])))
    segments, ids = _segments(model, processor.tokenizer, ["kenya"])
    assert decoder.ctc_decode(segments, ids) == [[offset + 3, offset + 3, offset + 7]]  # the last frame is padding


def test_every_position_sees_the_whole_segment_and_padding_changes_nothing(ctc):
    model, processor = ctc
    decoder = model.echo_decoder
    (long, short), _ = _segments(model, processor.tokenizer, ["the capital of kenya is nairobi", "is in africa"])
    logits, lengths = decoder.ctc_logits([long, short])
    assert lengths.tolist() == [3 * len(long), 3 * len(short)]
    alone, _ = decoder.ctc_logits([short])
    assert torch.allclose(logits[1, : lengths[1]], alone[0], atol=1e-5)
    changed = long.clone()
    changed[-1] += 1.0
    first, _ = decoder.ctc_logits([changed])
    assert not torch.allclose(first[0, 0], logits[0, 0])  # the first position reads the last one


def test_ctc_training_learns_a_segment(ctc):
    model, processor = ctc
    model = EchoXForSpeechToSpeech(model.config)
    model.load_state_dict(ctc[0].state_dict())
    config = model.config
    segments, ids = _segments(model, processor.tokenizer, ["the capital of kenya"])
    target = [config.unit_token_offset + u for u in (5, 9, 9, 2, 14)]
    labels = [torch.tensor(target + [config.echo_config.unit_eos_token_id])]
    before = model.echo_decoder.generate(segments, model.text_table, denoise=False, token_ids=ids)[0]
    optimizer = torch.optim.Adam(model.echo_decoder.parameters(), lr=3e-3)
    model.train()
    for _ in range(450):  # CTC leaves its all-blank start after ~300 steps here
        optimizer.zero_grad()
        loss = model._echo_loss(segments, labels, [False], ids)
        loss.backward()
        optimizer.step()
    model.eval()
    after = model.echo_decoder.generate(segments, model.text_table, denoise=False, token_ids=ids)[0]
    assert before != target and after == target and loss.item() < 0.1


def test_text_to_codec_forward(ctc):
    model, processor = ctc
    tokenizer, config = processor.tokenizer, model.config
    text_ids = tokenizer("monday comes after sunday", add_special_tokens=False).input_ids
    units = torch.tensor([[[config.unit_token_offset + 1, config.unit_token_offset + 4, config.echo_config.unit_eos_token_id]]])
    output = model(echo_text_ids=torch.tensor([[text_ids]]), unit_labels=units)
    assert torch.isfinite(output.loss) and output.loss is output.echo_loss


def test_stage2_trains_every_part_of_the_decoder_but_the_denoiser():
    from training.stages.stage2_t2c import DEFAULTS, freeze_for_text_to_codec

    for decoder_type in ("autoregressive", "ctc"):
        model, _ = build_random_echox("tiny", seed=0, echo_spelling_length=4, echo_decoder_type=decoder_type)
        freeze_for_text_to_codec(model, DEFAULTS["trainable_modules"])
        trained = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
        every = {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("echo_decoder.")}
        assert trained == every - {"denoiser"}
        assert ("upsample_embedding" in trained) == (decoder_type == "ctc")
