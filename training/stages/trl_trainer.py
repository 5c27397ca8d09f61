"""
EchoX on TRL: `EchoXSFTTrainer`, TRL's `SFTTrainer` training EchoX's own loss, and `sft_config`, its `SFTConfig`.

`SFTTrainer.compute_loss` runs the model through TRL's fused LM head (`add_fused_lm_head`: the backbone's last hidden
state × the output embeddings, cross-entropy in chunks) and never calls the model's `forward` for the loss, so
EchoX's CTC, echo and denoising losses would silently not train. `EchoXSFTTrainer` keeps everything else of
`SFTTrainer` (peft through `peft_config`, `SFTConfig`, its checkpoints and model card) and takes its loss from
`EchoXTrainer`, i.e. `Trainer.compute_loss`: `EchoXForSpeechToSpeech.forward(**batch).loss` (LM CE + CTC + echo +
denoise, whatever the batch carries), with the components logged. The fused head TRL attaches to the model stays
unused (it only runs when called with `fused_lm_head=True`); TRL's token metrics (`entropy`, `mean_token_accuracy`)
come from it and are therefore not logged. TRL's text-generation model card is not written (`create_model_card`).

The dataset is passed as is (`dataset_kwargs={"skip_prepare_dataset": True}`: TRL's tokenization knows nothing of
audio), every column reaches the collator (`remove_unused_columns=False`), and batches are built by
`EchoXDataCollator`. `SFTConfig`'s own defaults that would change the run against the Trainer path are set back:
no gradient checkpointing, no bf16 autocast (both only when the config does not ask for them).

    trainer = EchoXSFTTrainer(model=model, args=sft_config(config, ["labels", "ctc_labels"]),
                              train_dataset=dataset, data_collator=EchoXDataCollator(processor, model.config),
                              processing_class=processor, peft_config=lora_config(config["lora"], ["speech_adapter"]))
"""

from trl import SFTConfig, SFTTrainer

from .common import training_arguments
from .echox_trainer import EchoXTrainer


class EchoXSFTTrainer(EchoXTrainer, SFTTrainer):
    """
    `SFTTrainer` whose loss is EchoX's (`EchoXTrainer.compute_loss` → `Trainer.compute_loss` → the model's `forward`),
    never TRL's fused-LM-head cross-entropy. Takes `SFTTrainer`'s arguments (`peft_config`, `processing_class`, ...)
    plus `EchoXTrainer`'s `s_align`.
    """

    def create_model_card(self, *args, **kwargs) -> None:
        """
        Writes nothing: TRL's card (saved with every checkpoint) describes a text-generation model — its quick start
        runs `pipeline("text-generation")` — which EchoX is not. `training.finetune` writes EchoX's own card.
        """


def sft_config(config: dict, label_names: list[str]) -> SFTConfig:
    """
    The `SFTConfig` of a stage config (`training_args` as for `TrainingArguments`), with what EchoX's data needs:
    `skip_prepare_dataset`, `remove_unused_columns=False`, `label_names`; activation (gradient) checkpointing and bf16
    off unless `training_args` sets them (TRL turns both on by default; the Trainer path has them off).
    """
    asked = config.get("training_args") or {}
    return training_arguments(
        config,
        label_names,
        SFTConfig,
        dataset_kwargs={"skip_prepare_dataset": True},
        activation_checkpointing=asked.get("activation_checkpointing", asked.get("gradient_checkpointing", False)),
        bf16=asked.get("bf16", False),
    )
