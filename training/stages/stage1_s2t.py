"""
Stage I — speech-to-text: LoRA on the LLM + the fully trainable speech adapter; loss = CE on the response (and its
final eot) + 0.3 · CTC of the adapter's head against the transcript (blank = the `<audio>` placeholder). The speech
encoder stays frozen, so its outputs are cached on disk (`feature_cache`).

    python -m training.stages.stage1_s2t --config training/configs/stage1_tiny.json [--set trainer=trl]
    accelerate launch --config_file training/accelerate/ddp_cpu.yaml -m training.stages.stage1_s2t --config ...

Optional S-Align (the adversarial modality alignment of arXiv 2312.10952; `"s_align": {"enabled": true, ...}`, see
training/stages/s_align.py): a discriminator tells pooled speech-adapter outputs from pooled transcript embeddings;
the adapter learns to make them indistinguishable.
"""

import os

from accelerate import PartialState

from .common import (
    last_complete_checkpoint,
    load_model,
    prepare_trainable,
    run_trainer,
    stage_cli,
)
from .run_log import log_event
from .data import EchoXDataCollator, EncoderStateCache, load_dialogue_dataset

DEFAULTS = {
    "trainer": "trainer",  # "trainer" (transformers.Trainer) | "trl" (TRL's SFTTrainer, training/stages/trl_trainer.py)
    # the original Soundwave/EchoX stage-I recipe: LoRA r=64, alpha=16, dropout 0.05 on q/k/v of the LLM
    "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "trainable_modules": ["speech_adapter"],
    "s_align": {"enabled": False},  # fields: training/stages/s_align.py S_ALIGN_DEFAULTS
    # Optional CTC-only warm-up of the adapter before the Trainer run (adapter alone, no LLM pass): until its CTC head
    # learns to collapse frames, every encoder frame reaches the LLM, which makes the first full steps very slow.
    "ctc_warmup": {"steps": 0, "learning_rate": 1e-3, "batch_size": 16},
}


def build_feature_cache(model, processor, config, dataset):
    """An `EncoderStateCache` warmed with every clip of the dataset (main process first), or None."""
    if not config.get("feature_cache") or any(p.requires_grad for p in model.audio_tower.parameters()):
        return None
    directory = config.get("feature_cache_dir") or os.path.join(config["output_dir"], "encoder_cache")
    cache = EncoderStateCache(directory, model, processor.feature_extractor)
    with PartialState().main_process_first():
        cache.warm([path for path in dataset["audio"] if path])
    return cache


def ctc_warmup(model, collator, dataset, settings: dict, output_dir: str, seed: int = 0) -> dict | None:
    """
    Train the adapter's trainable weights on the CTC loss alone for `settings["steps"]` steps (AdamW); saved to
    `output_dir/ctc_warmup.safetensors` and reloaded from there on a re-run. Returns a summary (None when disabled).
    """
    import random

    import torch
    from safetensors.torch import load_file, save_file

    steps = int(settings.get("steps") or 0)
    if steps <= 0:
        return None
    path = os.path.join(output_dir, "ctc_warmup.safetensors")
    adapter = model.speech_adapter
    trainable = {name: p for name, p in adapter.named_parameters() if p.requires_grad}
    if os.path.isfile(path):
        saved = load_file(path)
        if set(saved) != set(trainable):  # e.g. saved from an adapter not wrapped by peft: nothing would load
            raise ValueError(
                f"{path} holds {sorted(set(saved) - set(trainable))[:3]}... where the adapter's trainable weights are "
                f"{sorted(set(trainable) - set(saved))[:3]}...: it is not a warm-up of this model; delete it to rerun."
            )
        adapter.load_state_dict(saved, strict=False)
        return {"ctc_warmup": "loaded", "path": path}
    optimizer = torch.optim.AdamW(trainable.values(), lr=settings.get("learning_rate", 1e-3), weight_decay=0.0)
    rng = random.Random(seed)
    rows = [i for i in range(len(dataset)) if dataset[i]["audio"]]
    adapter.train()
    losses, kept = [], []
    for step in range(steps):
        batch = collator([dataset[i] for i in rng.sample(rows, min(settings.get("batch_size", 16), len(rows)))])
        speech = model.get_speech_embeddings(
            batch.get("input_features"), batch.get("encoder_states"), batch.get("audio_frame_lengths")
        )
        loss = model._ctc_loss(speech.ctc_logits, batch["ctc_labels"], speech.ctc_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        kept.append(float(sum(len(e) for e in speech.speech_embeddings)) / len(speech.speech_embeddings))
        if PartialState().is_main_process and (step + 1) % 10 == 0:
            print(f"ctc warm-up step {step + 1}/{steps}: loss {sum(losses[-10:]) / 10:.3f}, "
                  f"speech tokens per clip {sum(kept[-10:]) / 10:.1f}", flush=True)
    os.makedirs(output_dir, exist_ok=True)
    save_file({name: p.detach().contiguous() for name, p in trainable.items()}, path)
    return {"ctc_warmup": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "speech_tokens_per_clip": kept[-1], "path": path}


def main(config: dict) -> dict:
    model, processor = load_model(config)
    dataset = load_dialogue_dataset(config["train_manifest"])
    cache = build_feature_cache(model, processor, config, dataset)
    collator = EchoXDataCollator(
        processor,
        model.config,
        stage="s2t",
        encoder_cache=cache,
        max_ctc_length=config["max_ctc_length"],
        max_response_tokens=config["max_response_tokens"],
    )
    model, trainer_kwargs = prepare_trainable(model, config)
    if config["ctc_warmup"].get("steps") and last_complete_checkpoint(config["output_dir"]) is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        summary = ctc_warmup(base, collator, dataset, config["ctc_warmup"], config["output_dir"],
                             config["training_args"].get("seed", 0))
        log_event(config["output_dir"], {"event": "ctc_warmup", **summary}, PartialState().is_main_process)
    model.train()
    return run_trainer(
        model, processor, config, dataset, collator, ["labels", "ctc_labels"], "stage1_s2t", s_align=config.get("s_align"),
        **trainer_kwargs,
    )


def cli():
    stage_cli(__doc__.strip().splitlines()[0], DEFAULTS, main)


if __name__ == "__main__":
    cli()
