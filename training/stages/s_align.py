"""
S-Align (arXiv 2312.10952, "soft alignment" of the speech and text spaces by adversarial training), adapted to
EchoX stage I.

What is aligned: the speech adapter's output (the vectors spliced into the LLM in place of `<audio>`) against the
LLM's input embeddings of the clip's transcript (the space they are spliced into; frozen in stage I). The paper
aligns the output of a shared speech/text encoder instead; EchoX has no text encoder, so the LLM input space is the
natural counterpart. As in the paper:

- discriminator (`TaskNetwork`): residual bottleneck (Linear H→H/2, ReLU, Linear H/2→H, dropout, + residual,
  LayerNorm) per vector, mean-pool over the sequence, Linear H→1 (no bias) → a logit; label speech = 0, text = 1;
- explicit two-player schedule (no gradient reversal): every training micro-batch, a discriminator step on detached
  representations (BCE with the true labels; its own AdamW), then a generator loss on the non-detached speech side
  with target 0.5 ("maximally confused") through the frozen discriminator, added to the stage-I loss × `weight`
  (paper: 4.0) from `generator_start_step` on (paper: 1000).

Config (`s_align` in the stage-I config): `{"enabled": true, "weight": 4.0, "generator_start_step": 1000,
"learning_rate": 1e-4, "dropout": 0.1}`. With several processes the discriminator's gradients are averaged across
ranks (it is not wrapped by DDP), so every rank holds the same discriminator; its weights and optimizer state are
saved as `s_align.pt` in each checkpoint and restored on resume.
"""

import torch
from torch import nn

S_ALIGN_DEFAULTS = {
    "enabled": False,
    "weight": 4.0,
    "generator_start_step": 1000,
    "learning_rate": 1e-4,
    "dropout": 0.1,
}
STATE_FILE = "s_align.pt"


class SAlignDiscriminator(nn.Module):
    """The S-Align `TaskNetwork`: sequences `[n_i, H]` → one modality logit each (speech 0, text 1)."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(hidden, hidden // 2)
        self.up = nn.Linear(hidden // 2, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for sequence in sequences:
            sequence = sequence.float()
            body = self.norm(sequence + self.dropout(self.up(torch.relu(self.down(sequence)))))
            pooled.append(body.mean(dim=0))
        return self.out(torch.stack(pooled)).squeeze(-1)


class SAlign:
    """Holds the discriminator, its optimizer and the captured speech embeddings of the current forward."""

    def __init__(self, base_model, settings: dict):
        self.settings = {**S_ALIGN_DEFAULTS, **settings}
        self.base_model = base_model
        hidden = base_model.config.text_config.hidden_size
        device = next(base_model.parameters()).device
        self.discriminator = SAlignDiscriminator(hidden, self.settings["dropout"]).to(device)
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.settings["learning_rate"])
        self._speech = None
        base_model.speech_adapter.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._speech = output.speech_embeddings

    def losses(self, inputs: dict, global_step: int, training: bool) -> tuple[torch.Tensor | None, dict]:
        """
        After the model's forward: one discriminator step, and the generator loss to add to the model loss
        (`None` before `generator_start_step` or without transcripts). Returns `(generator_term, logs)`.
        """
        speech, self._speech = self._speech, None
        ctc_labels = inputs.get("ctc_labels")
        if not training or speech is None or ctc_labels is None:
            return None, {}
        keep = [row for row in range(ctc_labels.shape[0]) if (ctc_labels[row] != -100).any()]
        if not keep:
            return None, {}
        table = self.base_model.get_input_embeddings().weight.detach()
        text = [table[ctc_labels[row][ctc_labels[row] != -100]] for row in keep]
        speech = [speech[row] for row in keep]
        bce = nn.functional.binary_cross_entropy_with_logits

        # discriminator step (detached inputs, true labels)
        self.discriminator.train()
        logits = self.discriminator([s.detach() for s in speech] + text)
        labels = torch.cat([torch.zeros(len(speech)), torch.ones(len(text))]).to(logits.device)
        d_loss = bce(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for parameter in self.discriminator.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= world
        self.optimizer.step()
        logs = {"s_align_d_loss": d_loss.detach()}

        if global_step < self.settings["generator_start_step"]:
            return None, logs
        # generator: speech side towards "can't tell" (0.5) through the frozen discriminator
        self.discriminator.requires_grad_(False)
        g_logits = self.discriminator(speech)
        self.discriminator.requires_grad_(True)
        g_loss = bce(g_logits, torch.full_like(g_logits, 0.5))
        logs["s_align_g_loss"] = g_loss.detach()
        return self.settings["weight"] * g_loss, logs

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
