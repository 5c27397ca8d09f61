"""Hearing first (training/stages/hearing.py): the CTC-only dictation path over cached encoder states."""

import numpy as np
import pytest
import soundfile as sf
import torch

from modeling_echox.model.modeling_echox import EchoXForSpeechToSpeech
from modeling_echox.testing.random_checkpoint import build_random_echox
from training.stages import hearing


@pytest.fixture(scope="module")
def tiny():
    """A tiny random EchoX with EchoX-mini's adapter settings (frames attend to each other; clip-cropped audio)."""
    model, processor = build_random_echox("tiny", seed=0)
    config = model.config
    config.adapter_per_frame_block = False
    config.crop_audio_padding = True
    config.adapter_dropout = 0.0
    torch.manual_seed(0)
    model = EchoXForSpeechToSpeech(config).eval()
    return model, processor


def _hearing(model, **kwargs):
    table = model.language_model.get_output_embeddings().weight.detach()
    torch.manual_seed(1)
    return hearing.HearingModel(model.config, table, model.audio_tower, **kwargs).eval()


def test_batched_frames_equal_the_adapter_on_each_clip(tiny):
    """Padding in a batch changes nothing: each clip's frames are the adapter's `encode_frames` of that clip alone."""
    model, _ = tiny
    net = _hearing(model)
    lengths = torch.tensor([12, 6, 9])
    states = torch.randn(3, 12, model.config.audio_config.d_model)
    for row, length in enumerate(lengths):
        states[row, length:] = 0
    frames, counts = net.frames(states, lengths)
    assert counts.tolist() == [6, 3, 5]
    for row, length in enumerate(lengths.tolist()):
        even = length + length % 2
        alone = net.speech_adapter.encode_frames(states[row : row + 1, :even])[0]
        torch.testing.assert_close(frames[row, : counts[row]], alone, atol=1e-5, rtol=1e-4)


def test_ctc_head_is_the_frozen_table_and_only_the_frame_path_trains(tiny):
    model, _ = tiny
    net = _hearing(model)
    table = model.language_model.get_output_embeddings().weight
    assert torch.equal(net.speech_adapter.ctc_head.weight, table)
    trainable = {name.split(".")[1] for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "frame_block", "out_norm"}


@pytest.mark.parametrize("rank", [None, 2])
def test_trained_ctc_head_starts_at_the_table_and_its_state_is_the_whole_head(tiny, rank):
    """A trained head (whole, or the frozen table + a rank-r correction) starts equal to the table, trains, and is
    saved as one `speech_adapter.ctc_head.weight` that gives the same logits in an EchoX model."""
    model, _ = tiny
    table = model.language_model.get_output_embeddings().weight
    net = _hearing(model, ctc_head="trained", ctc_head_rank=rank).train()
    frames = torch.randn(1, 5, table.shape[1])
    torch.testing.assert_close(net.head_logits(frames, net.vocab_ids), frames @ table.T)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    if rank:
        assert {"ctc_delta_rows", "ctc_delta_basis"} <= trainable and not net.speech_adapter.ctc_head.weight.requires_grad
    else:
        assert "speech_adapter.ctc_head.weight" in trainable
    states, lengths = torch.randn(1, 20, model.config.audio_config.d_model), torch.tensor([20])
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = net(states, lengths, torch.tensor([[3, 4, 5]]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head = net.trained_state()["speech_adapter.ctc_head.weight"]
    assert not torch.equal(head, table)
    torch.testing.assert_close(frames @ head.T, net.head_logits(frames, net.vocab_ids), atol=1e-4, rtol=1e-4)

    vocab = torch.tensor([3, 4, 5, model.config.audio_token_id])
    net.register_buffer("vocab_ids", vocab)
    head = net.trained_state()["speech_adapter.ctc_head.weight"]
    outside = torch.ones(len(head), dtype=torch.bool)
    outside[vocab] = False
    assert not head[outside].any() and head[vocab].abs().sum(-1).gt(0).all()  # the dictation writes corpus tokens only
    torch.testing.assert_close((frames @ head.T)[..., vocab], net.head_logits(frames, vocab), atol=1e-4, rtol=1e-4)


def test_a_rank_needs_a_trained_head(tiny):
    model, _ = tiny
    for head, rank in (("table", 4), ("trained", 0)):
        with pytest.raises(ValueError, match="ctc_head_rank"):
            _hearing(model, ctc_head=head, ctc_head_rank=rank)
    with pytest.raises(ValueError, match="ctc_head must be"):
        _hearing(model, ctc_head="tied")


@pytest.mark.parametrize("negatives", [0, 5])
def test_restricted_and_sampled_ctc_losses_train(tiny, negatives):
    model, _ = tiny
    blank = model.config.audio_token_id
    vocab = torch.tensor(sorted({3, 4, 5, 6, 7, 8, blank}))
    net = _hearing(model, vocab_ids=vocab, sampled_negatives=negatives).train()
    labels = torch.tensor([[3, 4, 5, -100], [6, 7, 8, 3]])
    if negatives:
        ids = net.sampled_ids(labels)
        assert torch.equal(ids, torch.unique(ids)) and {3, 4, 5, 6, 7, 8, blank} <= set(ids.tolist())
    states, lengths = torch.randn(2, 20, model.config.audio_config.d_model), torch.tensor([20, 16])
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = net(states, lengths, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    net.eval()
    assert net.dictate(states, lengths) == [[3, 4, 5], [6, 7, 8, 3]]  # learnt; restricted argmax
    assert len(net(states, lengths, restricted=False)["logits"][0, 0]) == model.config.text_config.vocab_size


def test_ctc_collapse():
    blank = 9
    assert hearing.ctc_collapse(torch.tensor([9, 3, 3, 9, 3, 4, 4, 9, 9, 5]), blank) == [3, 3, 4, 5]
    assert hearing.ctc_collapse(torch.tensor([9, 9]), blank) == []


def test_trained_state_loads_into_an_echox_model(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny
    net = _hearing(model)
    with torch.no_grad():
        net.speech_adapter.projector.weight.add_(1.0)
    state = net.trained_state()
    assert state and all(name.startswith("speech_adapter.") for name in state)
    path = str(tmp_path / "hearing_adapter.safetensors")
    save_file(state, path)
    target, _ = build_random_echox("tiny", seed=3)
    loaded = hearing.load_hearing_adapter(target, path)
    assert loaded == sorted(state)
    assert torch.equal(target.speech_adapter.projector.weight, net.speech_adapter.projector.weight)
    save_file({"speech_adapter.projector.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        hearing.load_hearing_adapter(target, path)


def test_partly_unfrozen_encoder_continues_from_the_cached_layer(tiny):
    """Cached states before the last layer + the trainable copy of that layer = the frozen encoder's own output."""
    model, processor = tiny
    encoder = model.audio_tower
    features = processor.feature_extractor(np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1,
                                           sampling_rate=16000, return_tensors="pt")["input_features"]
    full = hearing.encode_prefix(encoder, features, 26, len(encoder.layers))
    before = hearing.encode_prefix(encoder, features, 26, len(encoder.layers) - 1)
    net = _hearing(model, unfrozen_layers=1)
    lengths = torch.tensor([26])
    frames_cached, _ = net.frames(before[None], lengths)
    frozen = _hearing(model)
    frames_full, _ = frozen.frames(full[None], lengths)
    torch.testing.assert_close(frames_cached, frames_full, atol=1e-5, rtol=1e-4)
    names = set(net.trained_state())
    assert "audio_tower.layer_norm.weight" in names
    assert any(name.startswith(f"audio_tower.layers.{len(encoder.layers) - 1}.") for name in names)
    assert names <= set(model.state_dict())


def test_encoder_state_shards_are_cropped_cached_and_reused(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    encoder = model.audio_tower
    rng = np.random.default_rng(0)
    paths = []
    for index, seconds in enumerate((0.5, 1.2, 0.8)):
        path = str(tmp_path / f"clip{index}.wav")
        sf.write(path, rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1, 16000)
        paths.append(path)
    monkeypatch.setattr(hearing, "SHARD_SIZE", 2)
    shards = hearing.EncoderStateShards(str(tmp_path / "cache"), encoder, processor.feature_extractor, 1)
    index = shards.build(paths, "train", verbose=False)
    assert [entry[3] for entry in index] == [hearing.cropped_frames(int(s * 16000), 1500) for s in (0.5, 1.2, 0.8)]
    assert len({entry[0] for entry in index}) == 2  # two shards of at most 2 clips
    from modeling_echox.model.audio_io import load_audio

    wave = load_audio(paths[1], target_rate=16000)
    features = processor.feature_extractor(wave, sampling_rate=16000, padding="max_length",
                                           return_tensors="pt")["input_features"]
    expected = hearing.encode_prefix(encoder, features, index[1][3], 1).half()
    torch.testing.assert_close(shards.get(*[index[1][i] for i in (0, 2, 3)]), expected)
    monkeypatch.setattr(hearing, "encode_prefix", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert shards.build(paths, "train", verbose=False) == index  # every shard exists: nothing is encoded again
    dataset = hearing.DictationDataset(shards, index, [[3, 4], [5], []], ["a", "b", "c"], ["v", "v", "w"])
    batch = hearing.collate([dataset[i] for i in range(3)])
    assert batch["states"].shape[1] % 2 == 0 and batch["lengths"].tolist() == [e[3] for e in index]
    assert batch["labels"].tolist() == [[3, 4], [5, -100], [-100, -100]]


def test_bad_settings_are_refused(tmp_path):
    config = {**hearing.DEFAULTS, "ctc_vocabulary": "some", "output_dir": str(tmp_path), "train_manifest": "x",
              "eval_manifest": "y", "max_ctc_length": 10, "training_args": {}}
    with pytest.raises(ValueError, match="ctc_vocabulary"):
        hearing.main(config)
    with pytest.raises(ValueError, match="train_manifest"):
        hearing.main({**config, "ctc_vocabulary": "corpus", "eval_manifest": None})


def test_open_set_kinds_scores_each_group_and_whether_the_probe_name_was_heard():
    lines = [{"kind": "animals", "text": "what sound does a cow make"},
             {"kind": "small_talk", "text": "hello how are you"},
             {"kind": "probe_animal", "text": "what is a capybara", "probe": "capybara"},
             {"kind": "probe_person", "text": "who was tutankhamun", "probe": "tutankhamun"}]
    result = hearing.open_set_kinds(lines, ["what sound does a cow make", "hello how are", "what is a capybara",
                                            "who was tut"])
    assert result["everyday"] == {"clips": 1, "wer": 0.0}
    assert result["small_talk"]["wer"] == 0.25
    assert result["probe"]["clips"] == 2 and result["probe"]["names_probe"] == 0.5
    with pytest.raises(ValueError):
        hearing.open_set_kinds(lines, ["too few"])


def test_wer_per_voice_scores_each_voice_on_its_own_clips():
    references = ["the cat sat", "a dog", "hello there"]
    hypotheses = ["the cat sat", "a cat", "Hello, there!"]
    assert hearing.wer_per_voice(references, hypotheses, ["awb", "ked", "awb"]) == {"awb": 0.0, "ked": 0.5}
