"""
Stage I, behaviour-aligned (BLSP, BLSP-KD, DeSTA2: arXiv 2309.00916, 2405.19041, 2409.20007): the model given
the SPEECH of a prompt learns to answer as its text LLM answers the TRANSCRIPT.

    loss = CE(response) + 0.3 · CTC(transcript)      the model's own stage-I loss (`EchoXForSpeechToSpeech.forward`)
         + kl_weight · KL(p_text ‖ p_speech)          token-level distillation to the frozen text LLM (BLSP-KD)

    python -m training.stages.stage1_behaviour --config training/configs/mini_stage1_behaviour.json \
        --set model=build/runs/mini_base --set output_dir=build/runs/mini_stage1_behaviour \
        --set train_manifest=build/data/stages/s2t_behaviour.jsonl \
        --set taught_manifest=build/data/stages/s2t_train.jsonl

- `train_manifest`: spoken prompts whose `response_ids` are the text LLM's own greedy answer to the transcript
  (`training.data.behaviour_prompts`). CE makes that answer the target; the KL term adds the text LLM's whole
  next-token distribution at every answer position.
- `taught_manifest` (optional): the taught facts (the spoken QA's stage-I manifest), sampled (seeded) to make up
  `taught_share` of the examples. Their targets are the taught answers, which the text LLM may not give: CE + CTC
  only, no KL.
- KL: at each response position (teacher-forced, the final eot included), KL(teacher ‖ student) between the next-token
  distribution of the model given the speech and that of the teacher given the same prompt with the transcript's
  tokens in place of the `<audio>` placeholder — for EchoX-mini's chat template exactly the prompt the text LLM gets
  for the transcript (`EchoXProcessor.build_prompt_ids(transcript, has_audio=False)`), so the term is zero when the
  speech vectors are the transcript's text embeddings. The teacher runs on the fly: the same model given that text,
  in eval mode, without gradients, under peft's `disable_adapter()` (the LoRA off: the LLM as loaded).
- Keeping the LLM close to its text behaviour: `lora: null` trains the speech adapter only (the teacher is then the
  student's own LLM); with a LoRA the KL term holds it to the LLM as loaded.
- `init_adapter`: a `hearing_adapter.safetensors` of the hearing stage (`training.stages.hearing`), loaded into the
  model before training.
- `adapter_output`: set on the model before training and saved with it (`EchoXConfig.adapter_output`; null keeps the
  model's). With `"dictation"` the student reads the adapter's dictation of the speech (its hearing errors included)
  and the teacher the transcript: the LoRA learns to answer noisy dictations as the text LLM answers the true text,
  and only the CTC loss reaches the adapter (`trainable_modules: []` keeps the hearing stage's adapter as it is).
"""

import contextlib
import random

import torch
from accelerate import PartialState
from torch import nn

from modeling_echox.model.configuration_echox import ADAPTER_OUTPUTS

from .common import (
    apply_lora,
    load_model,
    run_trainer,
    stage_cli,
)
from .echox_trainer import EchoXTrainer
from .run_log import log_event
from .data import IGNORE_INDEX, EchoXDataCollator, load_dialogue_dataset
from .stage1_s2t import build_feature_cache

DEFAULTS = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "trainable_modules": ["speech_adapter"],
    "kl_weight": 1.0,
    "taught_manifest": None,
    "taught_share": 0.2,
    "init_adapter": None,
    "adapter_output": None,
}
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")


class BehaviourCollator(EchoXDataCollator):
    """
    Stage-I batches (`EchoXDataCollator`, stage "s2t") plus the teacher's text batch: each row's ids with its
    `<audio>` placeholder replaced by the transcript's tokens (`teacher_input_ids`, right-padded,
    `teacher_attention_mask`) and `teacher_labels`, the response targets of the rows to distil (a row whose
    `distill` is False gets none).
    """

    def __init__(self, processor, config, **kwargs):
        super().__init__(processor, config, stage="s2t", **kwargs)

    def __call__(self, examples):
        batch = super().__call__(examples)
        audio_id = self.config.audio_token_id
        rows, targets = [], []
        for row, example in enumerate(examples):
            keep = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][keep].tolist(), batch["labels"][row][keep].tolist()
            if audio_id in ids:
                at = ids.index(audio_id)
                transcript = self.tokenizer(example.get("transcript") or "", add_special_tokens=False).input_ids
                ids = ids[:at] + transcript + ids[at + 1 :]
                labels = labels[:at] + [IGNORE_INDEX] * len(transcript) + labels[at + 1 :]
            if not example.get("distill", True):
                labels = [IGNORE_INDEX] * len(labels)
            rows.append(ids)
            targets.append(labels)
        width = max(len(row) for row in rows)
        batch["teacher_input_ids"] = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows])
        batch["teacher_attention_mask"] = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        batch["teacher_labels"] = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in targets])
        return batch


def response_positions(input_ids, attention_mask, labels, clip_lengths, audio_token_id, teacher_labels):
    """
    (student positions, teacher positions): `(rows, columns)` index pairs of the logits that predict each distilled
    response token, in the same order on both sides. The student's rows had each `<audio>` placeholder replaced by
    its clip's `clip_lengths[i]` speech vectors (clips in row-major order, padding on the right), which shifts every
    later position by `length - 1`.
    """
    student_rows, student_columns, teacher_rows, teacher_columns = [], [], [], []
    clips = iter(clip_lengths)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][attention_mask[row].bool()]
        shift = sum(next(clips) - 1 for _ in range(int((ids == audio_token_id).sum())))
        wanted = torch.nonzero(teacher_labels[row] != IGNORE_INDEX).flatten()
        if not len(wanted):
            continue
        answer = torch.nonzero(labels[row] != IGNORE_INDEX).flatten()
        if len(answer) != len(wanted):
            raise ValueError(f"Row {row}: {len(answer)} response targets for the speech prompt but {len(wanted)} for "
                             "the text prompt.")
        student_rows += [row] * len(answer)
        student_columns += (answer + shift - 1).tolist()
        teacher_rows += [row] * len(wanted)
        teacher_columns += (wanted - 1).tolist()
    return (student_rows, student_columns), (teacher_rows, teacher_columns)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) between the rows' next-token distributions (`[tokens, V]` each)."""
    return nn.functional.kl_div(
        nn.functional.log_softmax(student_logits.float(), dim=-1),
        nn.functional.log_softmax(teacher_logits.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


class BehaviourTrainer(EchoXTrainer):
    """`EchoXTrainer` whose loss adds `kl_weight` × the KL to the text LLM (the module docstring); logs `kl_loss`."""

    def __init__(self, *args, kl_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
        self.kl_weight = kl_weight
        self._clip_lengths = None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.audio_token_id = base.config.audio_token_id
        base.speech_adapter.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._clip_lengths = [len(vectors) for vectors in output.speech_embeddings]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS if key in inputs}
        self._clip_lengths = []
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.kl_weight and teacher and (teacher["teacher_labels"] != IGNORE_INDEX).any():
            kl = self.kl_to_text_llm(model, inputs, outputs.logits, teacher)
            if model.training:
                self._components["kl_loss"].append(kl.detach().float())
            loss = loss + self.kl_weight * kl
        return (loss, outputs) if return_outputs else loss

    def kl_to_text_llm(self, model, inputs, student_logits, teacher) -> torch.Tensor:
        """KL(teacher ‖ student) over the distilled response tokens of the batch."""
        unwrapped = self.accelerator.unwrap_model(model)
        lora_off = unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext()
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), lora_off:
                teacher_logits = unwrapped(input_ids=teacher["teacher_input_ids"],
                                           attention_mask=teacher["teacher_attention_mask"]).logits
        finally:
            unwrapped.train(was_training)
        student_index, teacher_index = response_positions(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"], self._clip_lengths, self.audio_token_id,
            teacher["teacher_labels"])
        return token_kl(student_logits[student_index], teacher_logits[teacher_index])


def mixed_dataset(manifest, taught_manifest=None, taught_share: float = 0.2, seed: int = 0):
    """The behaviour examples (`distill` True) and a seeded sample of the taught ones (`distill` False) that makes up
    `taught_share` of the whole (all of them when there are fewer)."""
    import datasets

    behaviour = load_dialogue_dataset(manifest)
    behaviour = behaviour.add_column("distill", [True] * len(behaviour))
    if not taught_manifest or not taught_share:
        return behaviour
    if not 0 < taught_share < 1:
        raise ValueError(f"taught_share must be in [0, 1), got {taught_share}.")
    taught = load_dialogue_dataset(taught_manifest)
    wanted = min(len(taught), round(len(behaviour) * taught_share / (1 - taught_share)))
    taught = taught.select(sorted(random.Random(f"taught-{seed}").sample(range(len(taught)), wanted)))
    taught = taught.add_column("distill", [False] * len(taught))
    return datasets.concatenate_datasets([behaviour, taught])


def set_adapter_output(model, adapter_output: str) -> None:
    """Switch the model's speech interface (`EchoXConfig.adapter_output`, which its adapter reads)."""
    if adapter_output not in ADAPTER_OUTPUTS:
        raise ValueError(f"adapter_output must be one of {ADAPTER_OUTPUTS}, got {adapter_output!r}.")
    model.config.adapter_output = adapter_output


def main(config: dict) -> dict:
    model, processor = load_model(config)
    if config.get("init_adapter"):
        from .hearing import load_hearing_adapter

        loaded = load_hearing_adapter(model, config["init_adapter"])
        log_event(config["output_dir"], {"event": "init_adapter", "path": config["init_adapter"],
                                         "tensors": len(loaded)}, PartialState().is_main_process)
    if config.get("adapter_output"):
        set_adapter_output(model, config["adapter_output"])
    seed = config["training_args"].get("seed", 0)
    dataset = mixed_dataset(config["train_manifest"], config.get("taught_manifest"), config["taught_share"], seed)
    cache = build_feature_cache(model, processor, config, dataset)
    collator = BehaviourCollator(processor, model.config, encoder_cache=cache, max_ctc_length=config["max_ctc_length"],
                                 max_response_tokens=config["max_response_tokens"])
    model = apply_lora(model, config.get("lora"), config["trainable_modules"])
    model.train()

    def trainer_class(*args, **kwargs):
        return BehaviourTrainer(*args, kl_weight=config["kl_weight"], **kwargs)

    return run_trainer(model, processor, config, dataset, collator, ["labels", "ctc_labels", "teacher_labels"],
                       "stage1_behaviour", trainer_class=trainer_class)


def cli():
    stage_cli(__doc__.strip().splitlines()[0], DEFAULTS, main)


if __name__ == "__main__":
    cli()
