"""`EchoXTrainer`: the `Trainer` of every stage (the model's own loss, its components logged, optional S-Align)."""

import os
from collections import defaultdict

import torch
from transformers import Trainer

LOSS_KEYS = ("lm_loss", "ctc_loss", "echo_loss", "denoise_loss")


class EchoXTrainer(Trainer):
    """
    `Trainer` that also logs the model's loss components (`lm_loss`, `ctc_loss`, `echo_loss`, `denoise_loss`) and,
    with `s_align` settings, runs the S-Align two-player game (training/stages/s_align.py) next to the model loss.
    """

    def __init__(self, *args, s_align: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._components: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.s_align = None
        if s_align and s_align.get("enabled"):
            from .s_align import SAlign

            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self.s_align = SAlign(base, s_align)  # built after Trainer's set_seed: the same on every rank
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for parameter in self.s_align.discriminator.parameters():
                    torch.distributed.broadcast(parameter.data, src=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `Trainer.compute_loss` by name: the loss is the model's own (`outputs.loss`), even in a subclass whose other
        # base replaces it (TRL's SFTTrainer computes an LM-only loss through its fused LM head)
        loss, outputs = Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            for key in LOSS_KEYS:
                value = outputs.get(key) if hasattr(outputs, "get") else None
                if value is not None:
                    self._components[key].append(value.detach().float())
        if self.s_align is not None:
            term, logs = self.s_align.losses(inputs, self.state.global_step, model.training)
            for key, value in logs.items():
                self._components[key].append(value.float())
            if term is not None:
                loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        if self.s_align is not None and self.is_world_process_zero():
            from .s_align import STATE_FILE

            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.s_align.state_dict(), os.path.join(folder, STATE_FILE))  # before trainer_state.json
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.s_align is not None:
            from .s_align import STATE_FILE

            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if os.path.isfile(path):
                self.s_align.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=False))
            else:
                print(f"warning: {path} is missing; the S-Align discriminator restarts from scratch.")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._components:
            for key, values in sorted(self._components.items()):
                mean = torch.stack(values).mean().to(self.args.device)
                if self.args.world_size > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[key] = round(float(mean), 6)
            self._components.clear()
        super().log(logs, start_time)
