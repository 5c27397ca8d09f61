"""
Train the EchoX unit vocoder (`EchoXCodeHifiGan`: unit embedding + duration predictor + HiFi-GAN) the way fairseq /
speech-resynthesis train CodeHiFiGAN: HiFi-GAN multi-period + multi-scale discriminators, LSGAN + feature matching +
45 × log-mel L1, plus MSE on log(d + 1) for the duration predictor.

With `"vocoder": {"generator_type": "istft", ...}` (the light Vocos-style generator) the recipe is usually run with
`"adversarial": false`: no discriminator is built, and the generator learns from log-mel L1 + the multi-resolution
STFT loss (`stft_loss_weight` × (spectral convergence + log-magnitude L1)) + the duration loss, see
`training/configs/vocoder_istft_cpu.json`.

    python -m training.train_vocoder --config training/configs/vocoder_tiny.json
    accelerate launch -m training.train_vocoder --config training/configs/vocoder_full.json

Relative paths in the config (manifests, output_dir) are relative to the working directory. The run resumes from
the newest complete checkpoint in `output_dir/checkpoints/` automatically (e.g. after a kill); raise `max_steps`
to train further. Outputs in `output_dir`:

    checkpoints/step-XXXXXXXX/generator/       loadable with EchoXCodeHifiGan.from_pretrained (weight norm removed)
    checkpoints/step-XXXXXXXX/training_state.pt generator (weight-normed), discriminator, optimizers, schedulers, step
                                                (discriminator / its optimizer and scheduler are None without GAN)
    generator/                                  the final generator (same format)
    train_log.jsonl                             one JSON line per log / eval / resume event
    loss.png                                    loss curves, written at the end
"""

import argparse
import copy
import json
import math
import os
import shutil
import time
from typing import Any

import numpy as np
import torch

from modeling_echox.model.vocoder import EchoXCodeHifiGan

from .vocoder.checkpoints import STATE_FILE, latest_checkpoint, list_checkpoints
from .vocoder.data import VocoderCollator, VocoderSegmentDataset, read_manifest
from .vocoder.losses import (
    LogMelSpectrogram,
    MultiResolutionSTFTLoss,
    discriminator_loss,
    duration_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    mel_l1_loss,
)
from .vocoder.models import VocoderForTraining, build_models, export_generator
from .vocoder.train_log import JsonlLogger, plot_losses

DEFAULTS: dict[str, Any] = {
    "train_manifest": None,  # JSONL of {"audio", "units", "durations"} (required)
    "eval_manifest": None,  # optional held-out JSONL, evaluated on whole utterances
    "output_dir": None,  # required
    "vocoder": {},  # EchoXVocoderConfig fields
    "discriminator": {},  # DiscriminatorConfig fields
    # LogMelSpectrogram fields; log_floor "add" = log(mel + 1e-5), which keeps a gradient on near-silent output
    "mel": {"n_fft": 1024, "hop_length": 256, "win_length": 1024, "n_mels": 80, "fmin": 0.0, "fmax": None,
            "log_floor": "add"},
    "learning_rate": 2e-4,
    "adam_betas": [0.8, 0.99],
    "weight_decay": 0.0,
    "lr_decay": 0.999,  # lr × lr_decay every lr_decay_interval steps (HiFi-GAN: × 0.999 per epoch)
    "lr_decay_interval": 1000,
    "max_steps": 1000,
    "segment_frames": 28,  # 20 ms frames per training window (HiFi-GAN: 8960 samples = 28 frames)
    "batch_size": 16,  # per process
    "num_workers": 0,
    "cache_audio": False,  # keep whole waveforms in memory (small corpora / resampled files)
    "mel_loss_weight": 45.0,
    "feature_matching_weight": 1.0,  # on top of HiFi-GAN's built-in × 2
    "adversarial_weight": 1.0,
    "duration_loss_weight": 1.0,
    "disc_start_step": 0,  # steps of mel + duration loss only before the GAN losses start (0: GAN from the start)
    "adversarial": True,  # False: no discriminator, no GAN losses (the iSTFT generator's recipe)
    "stft_loss_weight": 0.0,  # multi-resolution STFT loss (spectral convergence + log-magnitude); 0 = off
    "stft_resolutions": [[512, 128, 512], [1024, 256, 1024], [256, 64, 256]],  # (n_fft, hop, win)
    "grad_clip": None,  # max grad norm, None = no clipping
    "mixed_precision": "no",  # Accelerator mixed_precision: "no", "bf16", "fp16"
    "num_threads": None,  # torch.set_num_threads on CPU (None: leave as is)
    "log_interval": 10,
    "eval_interval": 1000,  # 0 disables evaluation
    "eval_max_items": 16,
    "save_interval": 1000,  # a checkpoint is also written at the last step
    "keep_checkpoints": 3,  # newest checkpoints kept (0: keep all)
    "seed": 1234,
}
# config fields that shape the weights → the checkpoint entry holding those weights: a resumed run must use the same
# fields wherever the checkpoint holds the weights (a GAN-free one holds no discriminator, so a GAN phase after it may
# choose its discriminator's sizes)
_ARCHITECTURE_KEYS = {"vocoder": "generator", "discriminator": "discriminator"}


# ----------------------------------------------------------------------------------------------------------- config


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS ← JSON file ← overrides (dotted keys such as `"vocoder.unit_embed_dim"` reach into sub-dicts)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            user = json.load(handle)
        unknown = set(user) - set(DEFAULTS) - {"comment", "_comment"}
        if unknown:
            raise ValueError(f"{path}: unknown config fields {sorted(unknown)}.")
        for key, value in user.items():
            if key == "mel":
                config["mel"].update(value)
            else:
                config[key] = value
    for key, value in (overrides or {}).items():
        target, parts = config, key.split(".")
        if parts[0] not in DEFAULTS:
            raise ValueError(f"Unknown config field {parts[0]!r}.")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    for key in ("train_manifest", "output_dir"):
        if not config[key]:
            raise ValueError(f"The config needs {key!r}.")
    return config


def _lr_lambda(decay: float, interval: int):
    interval = max(int(interval), 1)
    return lambda step: decay ** (step // interval)


def _seed_step(seed: int, step: int, process_index: int):
    """Seeds torch (dropout) from `(seed, step, process)`: a resumed run draws the same random numbers as an
    uninterrupted one, whatever else (data loaders, evaluation) consumed in between."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, process_index]).generate_state(1)[0]))


# ------------------------------------------------------------------------------------------------------------- logs
# ------------------------------------------------------------------------------------------------------------ train


@torch.no_grad()
def evaluate(generator: EchoXCodeHifiGan, dataset: VocoderSegmentDataset, mel_fn, max_items: int, device) -> dict:
    """Whole held-out utterances: mel L1 with the true durations, duration loss and mean |frame error| of the
    predicted durations."""
    was_training = generator.training
    generator.eval()
    mel_l1, dur_loss, dur_error, count = 0.0, 0.0, 0.0, 0
    for index in range(min(len(dataset), max_items)):
        example = dataset[index]
        ids = example["input_ids"][None].to(device)
        durations = example["durations"][None].to(device)
        speaker = example.get("speaker_id")
        output = generator(ids, durations=durations, speaker_id=speaker)
        target = example["waveform"][None].to(device)
        n = min(target.shape[1], output.waveform.shape[1])
        mel_l1 += mel_l1_loss(mel_fn, output.waveform[:, :n], target[:, :n]).item()
        mask = torch.ones_like(ids, dtype=torch.bool)
        log_durations = generator._log_durations(generator.unit_embedding(ids), mask)
        dur_loss += duration_loss(log_durations, durations).item()
        predicted = generator.predict_durations(ids)
        dur_error += (predicted - durations).abs().float().mean().item()
        count += 1
    generator.train(was_training)
    count = max(count, 1)
    return {"eval_mel_l1": mel_l1 / count, "eval_loss_dur": dur_loss / count, "eval_dur_abs_error": dur_error / count}


def train(config: dict[str, Any]) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary `{"step", "resumed_from", "output_dir", ...}`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar at every checkpoint
    accelerator = Accelerator(mixed_precision=config["mixed_precision"])
    if config["num_threads"] and accelerator.device.type == "cpu":
        torch.set_num_threads(int(config["num_threads"]))
    output_dir = config["output_dir"]
    is_main = accelerator.is_main_process
    if is_main:
        os.makedirs(os.path.join(output_dir, "checkpoints"), exist_ok=True)
    accelerator.wait_for_everyone()
    logger = JsonlLogger(os.path.join(output_dir, "train_log.jsonl"), is_main)

    set_seed(config["seed"])  # same initial weights on every process
    generator, discriminator = build_models(config)
    vocoder_config = generator.config
    model = VocoderForTraining(generator)
    betas = tuple(config["adam_betas"])
    optimizer_g = torch.optim.AdamW(
        model.parameters(), config["learning_rate"], betas=betas, weight_decay=config["weight_decay"]
    )
    lr_lambda = _lr_lambda(config["lr_decay"], config["lr_decay_interval"])
    scheduler_g = torch.optim.lr_scheduler.LambdaLR(optimizer_g, lr_lambda)
    optimizer_d = scheduler_d = None
    if discriminator is not None:
        optimizer_d = torch.optim.AdamW(
            discriminator.parameters(), config["learning_rate"], betas=betas, weight_decay=config["weight_decay"]
        )
        scheduler_d = torch.optim.lr_scheduler.LambdaLR(optimizer_d, lr_lambda)

    step, resumed_from = 0, None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        state = torch.load(os.path.join(checkpoint, STATE_FILE), map_location="cpu", weights_only=False)
        for key, weights in _ARCHITECTURE_KEYS.items():
            if state.get(weights) is not None and state["config"][key] != config[key]:
                raise ValueError(
                    f"{checkpoint} was trained with {key}={state['config'][key]}, the config now says {config[key]}: "
                    "use a new output_dir to change the architecture."
                )
        generator.load_state_dict(state["generator"])
        optimizer_g.load_state_dict(state["optimizer_g"])
        scheduler_g.load_state_dict(state["scheduler_g"])
        # a GAN switched on after a GAN-free run starts from a fresh discriminator
        if discriminator is not None and state.get("discriminator") is not None:
            discriminator.load_state_dict(state["discriminator"])
            optimizer_d.load_state_dict(state["optimizer_d"])
            scheduler_d.load_state_dict(state["scheduler_d"])
        step = resumed_from = int(state["step"])
    if is_main:
        with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)

    items = read_manifest(config["train_manifest"], vocoder_config.num_units)
    dataset = VocoderSegmentDataset(
        items,
        config["segment_frames"],
        hop_length=vocoder_config.hop_length,
        sampling_rate=vocoder_config.sampling_rate,
        seed=config["seed"],
        cache_audio=config["cache_audio"],
    )
    per_step = config["batch_size"] * accelerator.num_processes
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config["batch_size"],
        shuffle=False,  # the dataset shuffles itself per epoch (deterministic, resumable)
        collate_fn=VocoderCollator(),
        num_workers=config["num_workers"],
        drop_last=len(dataset) >= per_step,
    )
    eval_dataset = None
    if config["eval_manifest"] and config["eval_interval"]:
        eval_items = read_manifest(config["eval_manifest"], vocoder_config.num_units)
        eval_dataset = VocoderSegmentDataset(
            eval_items, None, vocoder_config.hop_length, vocoder_config.sampling_rate, shuffle=False
        )

    if discriminator is not None:
        model, discriminator, optimizer_g, optimizer_d, loader = accelerator.prepare(
            model, discriminator, optimizer_g, optimizer_d, loader
        )
        raw_discriminator = accelerator.unwrap_model(discriminator)
    else:
        model, optimizer_g, loader = accelerator.prepare(model, optimizer_g, loader)
        raw_discriminator = None
    mel_fn = LogMelSpectrogram(sampling_rate=vocoder_config.sampling_rate, **config["mel"]).to(accelerator.device)
    stft_loss_fn = MultiResolutionSTFTLoss(config["stft_resolutions"]) if config["stft_loss_weight"] else None
    raw_generator = accelerator.unwrap_model(model).generator

    if resumed_from is not None:
        logger.write({"event": "resume", "step": step, "checkpoint": checkpoint, "time": time.time()})
    else:
        logger.write({"event": "start", "step": 0, "time": time.time(), "num_processes": accelerator.num_processes})

    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("The training manifest yields no batch: lower batch_size.")

    def save(at_step: int):
        final = os.path.join(output_dir, "checkpoints", f"step-{at_step:08d}")
        temporary = final + ".tmp"
        if is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary)
            export_generator(raw_generator, os.path.join(temporary, "generator"))
            state = {
                "step": at_step,
                "config": config,
                "generator": raw_generator.state_dict(),
                "discriminator": None if raw_discriminator is None else raw_discriminator.state_dict(),
                "optimizer_g": optimizer_g.state_dict(),
                "optimizer_d": None if optimizer_d is None else optimizer_d.state_dict(),
                "scheduler_g": scheduler_g.state_dict(),
                "scheduler_d": None if scheduler_d is None else scheduler_d.state_dict(),
            }
            torch.save(state, os.path.join(temporary, STATE_FILE))
        accelerator.wait_for_everyone()
        if is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)  # a kill before this line leaves only an ignored *.tmp folder
            keep = config["keep_checkpoints"]
            if keep:
                for _, old in list_checkpoints(output_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    max_steps = config["max_steps"]
    model.train()
    if discriminator is not None:
        discriminator.train()
    sums: dict[str, float] = {}
    interval_steps, interval_start = 0, time.time()
    last_saved = resumed_from
    first_step_seconds = None

    while step < max_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        dataset.set_data_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            step_start = time.time()
            _seed_step(config["seed"], step, accelerator.process_index)
            use_gan = discriminator is not None and step >= config["disc_start_step"]
            with accelerator.autocast():
                output = model(
                    batch["input_ids"], batch["attention_mask"], batch["durations"], batch.get("speaker_id")
                )
            fake = output["waveform"].float()
            length = min(fake.shape[1], batch["waveform"].shape[1])
            fake, real = fake[:, :length], batch["waveform"][:, :length]
            losses = {}

            if use_gan:
                with accelerator.autocast():
                    real_logits, fake_logits, _, _ = discriminator(real, fake.detach())
                loss_d = discriminator_loss(real_logits, fake_logits)
                optimizer_d.zero_grad()
                accelerator.backward(loss_d)
                if config["grad_clip"]:
                    accelerator.clip_grad_norm_(discriminator.parameters(), config["grad_clip"])
                optimizer_d.step()
                losses["loss_d"] = loss_d.detach()

            loss_mel = mel_l1_loss(mel_fn, fake, real)
            loss_dur = duration_loss(output["log_durations"], batch["target_durations"], batch["attention_mask"])
            loss_g = config["mel_loss_weight"] * loss_mel + config["duration_loss_weight"] * loss_dur
            if stft_loss_fn is not None:
                loss_sc, loss_mag = stft_loss_fn(fake, real)
                loss_g = loss_g + config["stft_loss_weight"] * (loss_sc + loss_mag)
                losses.update(loss_stft_sc=loss_sc.detach(), loss_stft_mag=loss_mag.detach())
            if use_gan:
                with accelerator.autocast():
                    _, fake_logits, real_maps, fake_maps = discriminator(real, fake)
                loss_adv = generator_adversarial_loss(fake_logits)
                loss_fm = feature_matching_loss(real_maps, fake_maps)
                loss_g = loss_g + config["adversarial_weight"] * loss_adv + config["feature_matching_weight"] * loss_fm
                losses.update(loss_adv=loss_adv.detach(), loss_fm=loss_fm.detach())
            optimizer_g.zero_grad()
            accelerator.backward(loss_g)
            if config["grad_clip"]:
                accelerator.clip_grad_norm_(model.parameters(), config["grad_clip"])
            optimizer_g.step()
            scheduler_g.step()
            if scheduler_d is not None:
                scheduler_d.step()
            losses.update(loss_g=loss_g.detach(), loss_mel=loss_mel.detach(), loss_dur=loss_dur.detach())

            step += 1
            if first_step_seconds is None:
                first_step_seconds = time.time() - step_start
            for key, value in losses.items():
                value = accelerator.reduce(value, reduction="mean").item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"step {step}: {key} = {value}")
                sums[key] = sums.get(key, 0.0) + value
            interval_steps += 1

            if step % config["log_interval"] == 0 or step == max_steps:
                elapsed = time.time() - interval_start
                record = {"event": "train", "step": step, "epoch": epoch, "lr": scheduler_g.get_last_lr()[0]}
                record.update({key: value / interval_steps for key, value in sums.items()})
                record.update(sec_per_step=elapsed / interval_steps, time=time.time())
                logger.write(record)
                sums, interval_steps, interval_start = {}, 0, time.time()
            if eval_dataset is not None and step % config["eval_interval"] == 0:
                if is_main:
                    metrics = evaluate(
                        raw_generator, eval_dataset, mel_fn, config["eval_max_items"], accelerator.device
                    )
                    logger.write({"event": "eval", "step": step, **metrics, "time": time.time()})
                accelerator.wait_for_everyone()
                interval_start = time.time()
            if (config["save_interval"] and step % config["save_interval"] == 0) or step == max_steps:
                save(step)
                last_saved = step
                interval_start = time.time()
            if step >= max_steps:
                break

    if last_saved != step:  # e.g. max_steps lowered below the newest checkpoint: nothing to train
        save(step)
    if is_main:
        final_dir = os.path.join(output_dir, "generator")
        shutil.rmtree(final_dir, ignore_errors=True)
        export_generator(raw_generator, final_dir)
        plot_losses(os.path.join(output_dir, "train_log.jsonl"), os.path.join(output_dir, "loss.png"))
        logger.write({"event": "end", "step": step, "time": time.time()})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": step,
        "resumed_from": resumed_from,
        "output_dir": output_dir,
        "checkpoint": latest_checkpoint(output_dir),
        "first_step_seconds": first_step_seconds,
    }


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config (see DEFAULTS in this file)")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--max-steps", type=int, help="overrides max_steps")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any field; VALUE is JSON if it parses (e.g. --set vocoder.unit_embed_dim=64)",
    )
    args = parser.parse_args(argv)
    overrides = _parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    summary = train(load_config(args.config, overrides))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
