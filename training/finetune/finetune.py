"""
`finetune`: fine-tune an EchoX checkpoint on your own spoken data in one call — the engine of `echox finetune`.

It turns the data into a manifest (`training.finetune.user_data`), runs stage I (speech → text) or stage III (echo)
with the stage's own code (`training/stages/stage1_s2t.py`, `stage3_echo.py`) on TRL's `SFTTrainer` (default) or
`transformers.Trainer`, and writes into `out`:

    out/                    the fine-tuned checkpoint (`AutoModel.from_pretrained(out)`, `AutoProcessor`, `echox speak
                            --model out`), with its model card README.md: the LoRA merged into the weights, or with
                            `save_adapter` a peft adapter alone (LoRA + the trained modules) naming `model` as its base,
                            which `AutoModel.from_pretrained(out)` loads onto it by itself (peft installed)
    out/training/           the run: train.jsonl (the manifest), audio/ (clips that were not files), encoder_cache/,
                            checkpoint-N/, train_log.jsonl, loss.png; a re-run resumes from it

What trains: stage I — a LoRA (r `lora_r`, α 2r, on the LLM's q/k/v projections) and the speech adapter but its CTC head
(kept: it chooses which frames reach the LLM); loss CE on the answer + 0.3 · CTC on the transcript. Stage III — the
echo decoder (denoiser included), plus a LoRA only when `lora_r` > 0; labels are made by the recipe (the model's own
greedy answers, voiced by its echo decoder without the denoiser), the loss is the echo CE + the denoising loss. Any
other stage-config field can be set with `overrides` (`"training_args.lr_scheduler_type=cosine"`, ...).

Runs under `accelerate launch` as the stages do (`-m modeling_echox.cli finetune ...`).
"""

import json
import os
import time
from typing import Any

from accelerate import PartialState

from ..stages import stage1_s2t, stage3_echo
from ..stages.common import TRAINERS, adapter_base, load_config
from ..stages.run_log import read_log
from ..stages.data import write_manifest
from .model_card import write_model_card
from .user_data import user_records

STAGES = {1: stage1_s2t, 3: stage3_echo}
STAGE_NAMES = {1: "stage I (speech → text)", 3: "stage III (echo)"}
# the speech adapter but its CTC head (as EchoX-mini's stage I trained it)
ADAPTER_MODULES = ["speech_adapter.projector", "speech_adapter.frame_block", "speech_adapter.out_norm",
                   "speech_adapter.look_back", "speech_adapter.look_back_norm"]
DEFAULT_LORA_R = {1: 16, 3: 0}
DEFAULT_LEARNING_RATE = {1: 3e-4, 3: 3e-4}
RUN_DIR = "training"


def _stage(stage) -> int:
    if str(stage).strip() not in ("1", "3"):
        raise ValueError(f"Unknown stage {stage!r}: choose 1 (speech → text) or 3 (echo training).")
    return int(stage)


def _check_paths(model: str, out: str) -> None:
    """Refuse a model that is no checkpoint directory and an output folder that would overwrite something else."""
    if not os.path.isdir(model) or not any(
        os.path.isfile(os.path.join(model, name)) for name in ("config.json", "adapter_config.json")
    ):
        raise ValueError(f"The model {model} is not an EchoX checkpoint directory (no config.json in it).")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ValueError(f"The output {out} is a file; give a folder.")
        if os.path.samefile(out, model):
            raise ValueError("The output folder must not be the model's folder.")
        if os.listdir(out) and not os.path.isdir(os.path.join(out, RUN_DIR)):
            raise ValueError(
                f"The output folder {out} already holds other files; give a new or empty folder (or the folder of an "
                "earlier fine-tune, to resume it)."
            )


def _write_if_changed(path: str, records: list[dict]) -> None:
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    write_manifest(path, records)


def finetune(
    model: str,
    data,
    out: str,
    stage: int | str = 1,
    trainer: str = "trl",
    max_steps: int = 100,
    lora_r: int | None = None,
    learning_rate: float | None = None,
    batch_size: int = 4,
    seed: int = 1234,
    save_adapter: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """
    Fine-tune the EchoX checkpoint directory `model` on `data` (a `datasets.Dataset`, a saved dataset folder or a
    JSONL file: `training.finetune.user_data`) and write the result to `out` (the module docstring).

    Args:
        stage: 1 (speech → text) or 3 (echo training).
        trainer: "trl" (TRL's `SFTTrainer`) or "trainer" (`transformers.Trainer`); both optimize EchoX's own loss.
        max_steps: optimizer steps. lora_r: LoRA rank (default 16 for stage I, none for stage III; 0: no LoRA).
        learning_rate: default 3e-4 (cosine schedule). batch_size: clips per step and process.
        save_adapter: keep the LoRA as a peft adapter (naming `model` as its base) instead of merging it.
        overrides: `KEY=VALUE` settings of any stage-config field (`training/stages/README.md`).

    Returns a summary: `checkpoint` (= `out`), `examples`, `global_step`, `first_loss`, `last_loss`, `seconds`, ...
    Raises ValueError / OSError for bad input (an unknown stage or trainer, a model that is no checkpoint, bad data).
    """
    stage = _stage(stage)
    if trainer not in TRAINERS:
        raise ValueError(f"Unknown trainer {trainer!r}: choose one of {', '.join(TRAINERS)}.")
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    lora_r = DEFAULT_LORA_R[stage] if lora_r is None else lora_r
    if not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"lora_r must be 0 (no LoRA) or a positive integer, got {lora_r!r}.")
    if save_adapter and not lora_r:
        raise ValueError("save_adapter keeps a LoRA as an adapter, but there is none: give a LoRA rank (lora_r > 0).")
    model, out = os.path.abspath(os.fspath(model)), os.path.abspath(os.fspath(out))
    _check_paths(model, out)
    run_dir = os.path.join(out, RUN_DIR)
    manifest = os.path.join(run_dir, "train.jsonl")
    state = PartialState()
    with state.main_process_first():  # one process writes the audio and the manifest, the others find them there
        records = user_records(data, os.path.join(run_dir, "audio"), stage)
        if state.is_main_process:
            _write_if_changed(manifest, records)

    module = STAGES[stage]
    lora = {"r": lora_r, "alpha": 2 * lora_r, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    settings: dict[str, Any] = {
        "model": model,
        "train_manifest": manifest,
        "output_dir": run_dir,
        "final_dir": out,
        "trainer": trainer,
        "lora": lora if lora_r else None,
        "trainable_modules": ADAPTER_MODULES if stage == 1 else ["echo_decoder"],
        "save_lora": "adapter_only" if save_adapter else "merged",
        "training_args": {
            "max_steps": max_steps,
            "per_device_train_batch_size": batch_size,
            "learning_rate": DEFAULT_LEARNING_RATE[stage] if learning_rate is None else float(learning_rate),
            "lr_scheduler_type": "cosine",
            "warmup_steps": min(10, max_steps // 10),
            "weight_decay": 0.0,
            "logging_steps": max(1, min(10, max_steps // 10)),
            "save_steps": max(10, max_steps // 4),
            "save_total_limit": 1,
            "seed": seed,
        },
    }
    if stage == 3:
        settings["generation"] = {"max_new_tokens": 48}
    config = load_config(None, module.DEFAULTS, list(overrides), extra=settings)
    if config["save_lora"] == "adapter_only":
        adapter_base(config)  # refuses a base that the adapter could not name, before any training
    started = time.time()
    result = module.main(config)
    losses = [entry for entry in read_log(run_dir) if "loss" in entry and "event" not in entry]
    summary = {
        "checkpoint": out,
        "model": model,
        "stage": stage,
        "trainer": trainer,
        "examples": len(records),
        "global_step": result["global_step"],
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "seconds": round(time.time() - started, 1),
        "save_adapter": save_adapter,
        "lora_r": lora_r,
    }
    if state.is_main_process:
        summary["card"] = write_model_card(out, summary, config, STAGE_NAMES[stage], data)
    state.wait_for_everyone()
    return summary
