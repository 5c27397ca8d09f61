"""The vocoder run's checkpoints: `output_dir/checkpoints/step-XXXXXXXX/`, complete once they hold `STATE_FILE`."""

import os
import re

_CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "training_state.pt"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those holding the state file) as `(step, path)`, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None
