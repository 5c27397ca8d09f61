"""The vocoder run's log (`train_log.jsonl`, one JSON line per log / eval / resume event) and its loss curves."""

import json
import os
from typing import Any


class JsonlLogger:
    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_losses(log_path: str, png_path: str) -> bool:
    """Loss curves from the JSONL log (per step, the newest record wins: steps redone after a resume replace the
    killed run's). Returns False if matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, evaluation = {}, {}
    for record in read_log(log_path):
        if record.get("event") == "train":
            train[record["step"]] = record
        elif record.get("event") == "eval":
            evaluation[record["step"]] = record
    if not train:
        return False
    panels = [
        ("mel L1", [("loss_mel", train, "train"), ("eval_mel_l1", evaluation, "eval")]),
        ("duration MSE (log d+1)", [("loss_dur", train, "train"), ("eval_loss_dur", evaluation, "eval")]),
        ("GAN / STFT", [("loss_adv", train, "G adversarial"), ("loss_fm", train, "feature matching"),
                        ("loss_d", train, "D"), ("loss_stft_sc", train, "STFT spectral convergence"),
                        ("loss_stft_mag", train, "STFT log-magnitude")]),
        ("generator total", [("loss_g", train, "train")]),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, (title, curves) in zip(axes.flat, panels):
        for key, records, label in curves:
            points = sorted((step, r[key]) for step, r in records.items() if r.get(key) is not None)
            if points:
                axis.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=90)
    plt.close(figure)
    return True
