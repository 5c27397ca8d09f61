"""
Shared machinery of the three EchoX training stages: JSON configs, model loading, LoRA, a `transformers.Trainer`
subclass that logs every loss component, resuming after a kill, the loss plot and the final EchoX checkpoint.

Every stage entry point reads one JSON config (see `training/configs/stage*_tiny.json`); `--set key=value` overrides
any field (dotted keys reach into sub-objects, values are parsed as JSON when they can be). Relative paths are
relative to the working directory. A stage writes into `output_dir`:

    checkpoint-N/           Trainer checkpoints (the run resumes from the newest complete one automatically)
    train_log.jsonl         one JSON line per log event (loss components included) and per resume
    loss.png                the loss curves, written at the end
    final/                  a loadable EchoX checkpoint (model + processor); with `save_lora: "adapter"` the LoRA stays
                            separate in final/lora_adapter/ (load with `load_trained_echox`)

Stages I and III train on `transformers.Trainer` (`EchoXTrainer`) or, with `"trainer": "trl"`, on TRL's `SFTTrainer`
(`training/stages/trl_trainer.py`); either way the loss optimized is the one `EchoXForSpeechToSpeech.forward` returns.
"""

import argparse
import json
import os
import re
import time
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainingArguments, set_seed

from modeling_echox import EchoXForSpeechToSpeech, EchoXProcessor

from .echox_trainer import EchoXTrainer
from .run_log import JsonlLogCallback, log_event, plot_losses

ADAPTER_DIR = "lora_adapter"

COMMON_DEFAULTS: dict[str, Any] = {
    "model": "random:tiny",  # a checkpoint directory, or "random:<size>" (build_random_echox)
    "model_seed": 0,  # seed of a random model
    # a stage-0 output directory (training/stages/stage0_units.py): its unit language (`unit_language/`) is the unit
    # vocabulary the model speaks. A "random:<size>" model is built with it (unit_vocab_size, num_units, unit table);
    # a checkpoint must already have it (a mismatch is an error, never a silent resize). None: the model's own.
    "units_from": None,
    "train_manifest": None,  # JSONL manifest(s) (training/stages/data.py)
    "output_dir": None,
    "feature_cache": True,  # cache the frozen speech encoder's outputs on disk (ignored when it trains)
    "feature_cache_dir": None,  # default: <output_dir>/encoder_cache
    "disable_dropout": False,  # set every dropout to 0 (exact DDP-vs-single-process comparisons)
    "max_response_tokens": 512,
    "max_ctc_length": 300,
    # "merged" | "adapter" (the base weights + the LoRA in lora_adapter/) | "adapter_only" (the LoRA and the trained
    # modules alone, a peft adapter naming `model`, a checkpoint directory, as its base: see `save_final`)
    "save_lora": "merged",
    "final_dir": None,  # where the final checkpoint goes (default: <output_dir>/final)
    "lora": None,
    "trainable_modules": [],
    "training_args": {},  # any transformers.TrainingArguments field
}

TRAINING_ARGS_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.01,  # < 1: a fraction of max_steps
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_steps": 1000,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 3,
    "report_to": "none",
    "seed": 1234,
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,
}


# --------------------------------------------------------------------------------------------------------- config
def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(config: dict, assignment: str) -> None:
    key, _, raw = assignment.partition("=")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_config(path: str | None, defaults: dict, overrides: list[str] | None = None, extra: dict | None = None) -> dict:
    """Stage defaults ← the JSON file ← `extra` ← `--set` overrides; keys starting with "_" are comments."""
    config = _merge(COMMON_DEFAULTS, defaults)
    if path:
        with open(path, encoding="utf-8") as handle:
            config = _merge(config, json.load(handle))
    if extra:
        config = _merge(config, extra)
    for assignment in overrides or []:
        _set_dotted(config, assignment)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = set(config) - set(COMMON_DEFAULTS) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown config field(s): {sorted(unknown)}")
    if not config.get("output_dir"):
        raise ValueError("The config needs an output_dir.")
    return config


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------------- model
def stage_cli(description: str, defaults: dict, main) -> None:
    """A stage's command line: `--config FILE [--set KEY=VALUE ...]`, then `main(config)`; prints its summary once."""
    args = parse_args(description)
    summary = main(load_config(args.config, defaults, args.set))
    if PartialState().is_main_process:
        print(summary)


def load_trained_echox(path: str, merge_lora: bool = True):
    """
    `(model, processor)` from a stage's `final/` directory (or any EchoX checkpoint). A LoRA kept as an adapter
    (`final/lora_adapter/`, or an adapter-only checkpoint: `adapter_config.json` naming its base, no `config.json`)
    is applied on top; `merge_lora` folds it into the weights.
    """
    processor = EchoXProcessor.from_pretrained(path)
    adapter = os.path.join(path, ADAPTER_DIR)
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        model, adapter = EchoXForSpeechToSpeech.from_pretrained(base), path
    else:
        model = EchoXForSpeechToSpeech.from_pretrained(path)
    if os.path.isdir(adapter):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_lora:
            model = model.merge_and_unload()
    return model, processor


def load_units_language(units_from: str):
    """The `EchoXUnitLanguage` of a stage-0 output directory (`<units_from>/unit_language/`)."""
    from modeling_echox.units.unit_language import EchoXUnitLanguage

    directory = os.path.join(units_from, "unit_language")
    if not os.path.isdir(directory):
        raise ValueError(f"units_from={units_from!r} is not a stage-0 output directory (no unit_language/ in it).")
    return EchoXUnitLanguage.from_pretrained(directory)


def check_unit_vocabulary(model, processor, language, source: str, units_from: str) -> None:
    """Raise a ValueError unless the model (config, unit table, processor) speaks the stage-0 unit language."""
    vocabulary = language.to_vocabulary()
    config = model.config
    problems = []
    if config.unit_vocab_size != len(vocabulary):
        problems.append(f"unit_vocab_size {config.unit_vocab_size} ≠ {len(vocabulary)}")
    if config.num_units != language.num_units:
        problems.append(f"num_units {config.num_units} ≠ {language.num_units}")
    if not problems:
        expected = vocabulary.to_unit_table(config.num_units)
        table = model.unit_table.detach().cpu()
        width = max(expected.shape[1], table.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
        if not torch.equal(pad(table), pad(expected)):
            problems.append("its unit_table spells other units")
    own = getattr(processor, "unit_vocabulary", None)
    if not problems and own is not None and list(own.pieces) != list(vocabulary.pieces):
        problems.append("its processor's unit vocabulary has other pieces")
    if problems:
        raise ValueError(
            f"The checkpoint {source!r} does not use the unit language of units_from={units_from!r} "
            f"({'; '.join(problems)}). Train from a checkpoint built with that unit language (or a random:<size> "
            "model), or drop units_from; the unit vocabulary is never resized silently."
        )


def load_model(config: dict):
    """
    The starting model and processor of a stage (a LoRA adapter of an earlier stage is merged first). With
    `units_from` (a stage-0 directory) a random model is built with its unit language; a checkpoint is checked to
    already use it.
    """
    name = config["model"]
    units_from = config.get("units_from")
    language = load_units_language(units_from) if units_from else None
    if isinstance(name, str) and name.startswith("random:"):
        from modeling_echox.testing.random_checkpoint import build_random_echox

        kwargs = {}
        if language is not None:
            kwargs = {"unit_vocabulary": language.to_vocabulary(), "num_units": language.num_units}
        model, processor = build_random_echox(name.split(":", 1)[1], seed=config.get("model_seed", 0), **kwargs)
    else:
        model, processor = load_trained_echox(name, merge_lora=True)
        if language is not None:
            check_unit_vocabulary(model, processor, language, name, units_from)
    if config.get("disable_dropout"):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
            elif hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
                module.attention_dropout = 0.0
    return model, processor


def lora_target_regex(targets) -> str:
    """A list of projection names → a regex that only hits the LLM's layers (never the echo decoder's)."""
    if isinstance(targets, str):
        return targets
    names = "|".join(re.escape(name) for name in targets)
    return rf"language_model\..*\.({names})"


def freeze_except(model, trainable_prefixes: list[str]) -> None:
    """Freeze every parameter but those under the given module paths (e.g. "speech_adapter", "echo_decoder")."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name == p or name.startswith(p + ".") for p in trainable_prefixes))


def lora_config(lora: dict, modules_to_save: list[str]):
    """The peft `LoraConfig` of a config's `lora` settings (on the LLM only), `modules_to_save` fully trainable."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.get("r", 64),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.05),
        target_modules=lora_target_regex(lora.get("target_modules", ["q_proj", "k_proj", "v_proj"])),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )


def apply_lora(model, lora: dict | None, modules_to_save: list[str]):
    """
    Wrap `model` in a peft LoRA (on the LLM only) with `modules_to_save` fully trainable; without `lora`, just
    freeze everything but `modules_to_save`. Returns the model to train.
    """
    if not lora:
        freeze_except(model, modules_to_save)
        return model
    from peft import get_peft_model

    freeze_except(model, [])
    return get_peft_model(model, lora_config(lora, modules_to_save))


TRAINERS = ("trainer", "trl")


def trainer_name(config: dict) -> str:
    """The config's `trainer` ("trainer": `transformers.Trainer`, the default; "trl": TRL's `SFTTrainer`)."""
    name = config.get("trainer", "trainer")
    if name not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {name!r}.")
    return name


def prepare_trainable(model, config: dict) -> tuple[Any, dict]:
    """
    Make trainable what `config` trains (`lora`, `trainable_modules`), the way its trainer wants it; returns the model
    to hand to `run_trainer` and the trainer's extra arguments. "trainer": the LoRA is applied here (`apply_lora`);
    "trl": the model stays unwrapped (only `trainable_modules` trainable, e.g. for stage I's CTC warm-up) and the
    `LoraConfig` goes to `SFTTrainer` as `peft_config`. Both seed peft's LoRA initialisation with
    `training_args.seed` right before it (as `SFTTrainer` does), so both trainers start from the same weights.
    """
    lora, modules = config.get("lora"), list(config["trainable_modules"])
    if trainer_name(config) == "trl":
        freeze_except(model, modules)
        return model, ({"peft_config": lora_config(lora, modules)} if lora else {})
    set_seed(_merge(TRAINING_ARGS_DEFAULTS, config.get("training_args") or {})["seed"])
    return apply_lora(model, lora, modules), {}


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def last_complete_checkpoint(output_dir: str) -> str | None:
    """Newest `checkpoint-N` that holds a `trainer_state.json` (written last), so a kill mid-save is skipped."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def training_arguments(config: dict, label_names: list[str], args_class=TrainingArguments, **fixed):
    """
    `args_class` (`TrainingArguments` or a subclass such as TRL's `SFTConfig`) from the stage defaults and the config's
    `training_args`; `fixed` fields are set last.
    """
    kwargs = _merge(TRAINING_ARGS_DEFAULTS, config.get("training_args") or {})
    kwargs.update(
        output_dir=config["output_dir"],
        remove_unused_columns=False,  # the collator needs every manifest column; the model takes extra tensors
        label_names=label_names,  # so evaluation treats the extra target tensors as labels
    )
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    kwargs.update(fixed)
    return args_class(**kwargs)


SAVE_LORA_MODES = ("merged", "adapter", "adapter_only")


def adapter_base(config: dict) -> str:
    """
    The base checkpoint an "adapter_only" final checkpoint names: `model`, which must be a complete checkpoint
    directory (its own weights, no separate LoRA), as an absolute path. Raises a ValueError otherwise.
    """
    name = config["model"]
    path = os.path.abspath(name) if isinstance(name, str) and not name.startswith("random:") else None
    complete = path is not None and os.path.isfile(os.path.join(path, "config.json"))
    if not complete or os.path.isdir(os.path.join(path, ADAPTER_DIR)):
        raise ValueError(
            f"save_lora 'adapter_only' keeps only the LoRA and names the model it was trained from as its base, so the "
            f"model must be a complete checkpoint directory (config.json and weights, no {ADAPTER_DIR}/); got {name!r}."
        )
    return path


def save_final(trainer: Trainer, model, processor, config: dict) -> str:
    """
    Write the final checkpoint (`final_dir`, default `output_dir/final/`) with the processor, by `save_lora`:
    "merged": the LoRA folded into the weights; "adapter": the base weights (with the trained modules) and the LoRA in
    `lora_adapter/`; "adapter_only": a peft adapter alone (LoRA + trained modules, `adapter_config.json` naming the
    `model` directory as its base), which `AutoModel.from_pretrained(final)` loads onto that base by itself
    (transformers' peft integration) and `load_trained_echox` merges. Without a LoRA the whole model is saved.
    """
    final = config.get("final_dir") or os.path.join(config["output_dir"], "final")
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return final
    unwrapped = trainer.accelerator.unwrap_model(model)
    mode = config.get("save_lora", "merged")
    if mode not in SAVE_LORA_MODES:
        raise ValueError(f"save_lora must be one of {SAVE_LORA_MODES}, got {mode!r}.")
    if hasattr(unwrapped, "peft_config") and mode == "adapter_only":
        for peft_config in unwrapped.peft_config.values():
            peft_config.base_model_name_or_path = adapter_base(config)
        unwrapped.save_pretrained(final)
        processor.save_pretrained(final)
        trainer.accelerator.wait_for_everyone()
        return final
    if hasattr(unwrapped, "peft_config"):
        if mode == "adapter":
            unwrapped.save_pretrained(os.path.join(final, ADAPTER_DIR))
            base = unwrapped.unload()
        else:
            base = unwrapped.merge_and_unload()
    else:
        base = unwrapped
    base.save_pretrained(final)
    processor.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    return final


def run_trainer(
    model, processor, config: dict, train_dataset, collator, label_names: list[str], stage: str,
    s_align: dict | None = None, trainer_class=None, **trainer_kwargs,
) -> dict:
    """
    Train (resuming from the newest complete checkpoint), plot the losses, save the final checkpoint; returns a summary.
    The config's `trainer` picks `EchoXTrainer` (`TrainingArguments`) or, for "trl", `EchoXSFTTrainer` (`SFTConfig`,
    the processor as its `processing_class`). `trainer_class`: a callable building an `EchoXTrainer` subclass from the
    same arguments instead; `trainer_kwargs` (e.g. `peft_config` from `prepare_trainable`) go to the trainer.
    """
    output_dir = config["output_dir"]
    if trainer_name(config) == "trl":
        from .trl_trainer import EchoXSFTTrainer, sft_config

        args = sft_config(config, label_names)
        trainer_class = trainer_class or EchoXSFTTrainer
        trainer_kwargs.setdefault("processing_class", processor)
    else:
        args = training_arguments(config, label_names)
        trainer_class = trainer_class or EchoXTrainer
        trainer_kwargs.setdefault("processing_class", None)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[JsonlLogCallback(os.path.join(output_dir, "train_log.jsonl"))],
        s_align=s_align,
        **trainer_kwargs,
    )
    if trainer.model_accepts_loss_kwargs:  # EchoX sets accepts_loss_kwargs = False: its loss is a per-batch mean
        raise RuntimeError("Trainer would treat the EchoX loss as normalised for gradient accumulation; it is not.")
    is_main = trainer.is_world_process_zero()
    resume = last_complete_checkpoint(output_dir)
    log_event(
        output_dir,
        {"event": "start", "stage": stage, "trainer": trainer_name(config), "resume_from": resume,
         "world_size": args.world_size, **count_parameters(trainer.model)},
        is_main,
    )
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    final = save_final(trainer, trainer.model, processor, config)
    plot = None
    if is_main:
        plot = plot_losses(trainer.state.log_history, os.path.join(output_dir, "loss.png"), f"EchoX {stage}")
    summary = {
        "event": "end",
        "stage": stage,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "seconds": time.time() - started,
        "resumed_from": resume,
        "final": final,
        "plot": plot,
    }
    log_event(output_dir, summary, is_main)
    return summary
