"""A training run's log: `train_log.jsonl` (every Trainer log line and the run's own events) and its loss plot."""

import json
import math
import os
import time
from collections import defaultdict

from transformers import TrainerCallback


class JsonlLogCallback(TrainerCallback):
    """Appends every log event to `train_log.jsonl` (main process only)."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")


def plot_losses(log_history: list[dict], path: str, title: str = "") -> str | None:
    """Loss curves (every `*loss` key against the step) → PNG. Returns the path, or None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in log_history:
        for key, value in entry.items():
            if (key == "loss" or key.endswith("_loss")) and isinstance(value, (int, float)) and math.isfinite(value):
                if key.startswith("eval_") or "step" not in entry:
                    continue
                series[key].append((entry["step"], float(value)))
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        axis.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 30 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def read_log(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def log_event(output_dir: str, event: dict, is_main: bool = True) -> None:
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "train_log.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **event}) + "\n")
