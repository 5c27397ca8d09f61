"""
Stage I — speech-to-text: LoRA on the LLM + the fully trainable speech adapter; loss = CE on the response (and its
final eot) + 0.3 · CTC of the adapter's head against the transcript (blank = the `<audio>` placeholder). The speech
encoder stays frozen, so its outputs are cached on disk (`feature_cache`).

    python -m training.stages.stage1_s2t --config training/configs/stage1_tiny.json
    accelerate launch --config_file training/accelerate/ddp_cpu.yaml -m training.stages.stage1_s2t --config ...

Optional S-Align (the adversarial modality alignment of arXiv 2312.10952; `"s_align": {"enabled": true, ...}`, see
training/stages/s_align.py): a discriminator tells pooled speech-adapter outputs from pooled transcript embeddings;
the adapter learns to make them indistinguishable.
"""

import os

from accelerate import PartialState

from .common import apply_lora, load_model, run_trainer, stage_cli
from .data import EchoXDataCollator, EncoderStateCache, load_dialogue_dataset

DEFAULTS = {
    # the original Soundwave/EchoX stage-I recipe: LoRA r=64, alpha=16, dropout 0.05 on q/k/v of the LLM
    "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "trainable_modules": ["speech_adapter"],
    "s_align": {"enabled": False},  # fields: training/stages/s_align.py S_ALIGN_DEFAULTS
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
    model = apply_lora(model, config.get("lora"), config["trainable_modules"])
    model.train()
    return run_trainer(
        model, processor, config, dataset, collator, ["labels", "ctc_labels"], "stage1_s2t", s_align=config.get("s_align")
    )


def cli():
    stage_cli(__doc__.strip().splitlines()[0], DEFAULTS, main)


if __name__ == "__main__":
    cli()
