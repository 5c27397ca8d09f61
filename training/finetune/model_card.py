"""
The model card (`README.md`) of a fine-tuned EchoX checkpoint: what it was fine-tuned from and on, how, the loss it
reached, and how to load and ask it. Written with `huggingface_hub.ModelCard` (YAML metadata + markdown).
"""

import os

from huggingface_hub import ModelCard, ModelCardData

from ..stages.run_log import read_log

TRAINER_NAMES = {"trl": "TRL `SFTTrainer` (EchoX's own loss, `training/stages/trl_trainer.py`)",
                 "trainer": "`transformers.Trainer` (`EchoXTrainer`)"}


def _losses(run_dir: str) -> str:
    entries = [entry for entry in read_log(run_dir) if "loss" in entry and "event" not in entry]
    if not entries:
        return "no loss was logged"
    first, last = entries[0], entries[-1]
    parts = [f"`{key}` {first[key]:.3f} → {last[key]:.3f}" for key in
             ("loss", "lm_loss", "ctc_loss", "echo_loss", "denoise_loss") if key in first and key in last]
    return f"step {first['step']} → {last['step']}: " + ", ".join(parts)


def write_model_card(out: str, summary: dict, config: dict, stage_name: str, data) -> str:
    """Write `out/README.md` for the fine-tune `summary` (from `finetune`) run with the stage `config`; its path."""
    args = config["training_args"]
    adapter = summary["save_adapter"]
    lora = config.get("lora")
    data_name = os.path.abspath(os.fspath(data)) if isinstance(data, (str, os.PathLike)) else "a `datasets.Dataset`"
    metadata = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["echox", "speech-to-speech", "fine-tuned", summary["trainer"], *(["lora", "peft"] if lora else [])],
    )
    trained = []
    if lora:
        trained.append(f"a LoRA (r {lora['r']}, α {lora['alpha']}) on the LLM's {', '.join(lora['target_modules'])}")
    trained += [f"`{name}`" for name in config["trainable_modules"]]
    if adapter:
        form = (f"a peft adapter (the LoRA and the trained modules) on the base checkpoint `{summary['model']}`, which "
                "must stay where it is; `AutoModel.from_pretrained` loads the base and attaches the adapter (peft must "
                "be installed)")
    else:
        form = "a complete checkpoint (the LoRA merged into the weights)" if lora else "a complete checkpoint"
    body = f"""
# EchoX fine-tuned on your own speech

Fine-tuned from `{summary['model']}` with `echox finetune`: {stage_name}, on {summary['examples']} spoken examples from
{data_name}. This folder is {form}.

## Training

- trainer: {TRAINER_NAMES[summary['trainer']]}
- trained: {'; '.join(trained)}; everything else frozen
- {summary['global_step']} steps, {args['per_device_train_batch_size']} clips per step and process, learning rate
  {args['learning_rate']} ({args['lr_scheduler_type']}), seed {args['seed']}; {summary['seconds']:.0f} s
- loss ({_losses(config['output_dir'])}); the whole log: `training/train_log.jsonl`, plot: `training/loss.png`

## Use

```python
import modeling_echox  # registers EchoX with the Auto classes
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{summary['checkpoint']}").eval()
processor = AutoProcessor.from_pretrained("{summary['checkpoint']}")
out = model.generate(**processor(audio="question.wav"), processor=processor)
print(out.text[0])  # the answer; out.waveforms[0]: the spoken answer at out.sampling_rate
```

or `echox speak question.wav -o answer.wav --model {summary['checkpoint']}`.

## Limits

This model saw {summary['examples']} examples for {summary['global_step']} steps: it answers like them, and a short
fine-tune can also change answers it gave before to other questions. Measure what you need (`echox eval`) before relying
on it.
"""
    path = os.path.join(out, "README.md")
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(path)
    return path
