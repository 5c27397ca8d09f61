"""Faults that used to pass silently or end in a traceback: damaged checkpoints, cut files, bad output paths."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_echox import EchoXForSpeechToSpeech
from modeling_echox.cli import main
from modeling_echox.loading import load_echox
from modeling_echox.random_checkpoint import write_random_checkpoint

SR = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POISONED = "language_model.model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("audio") / "q.wav")
    rng = np.random.default_rng(0)
    soundfile.write(path, (0.05 * rng.standard_normal(int(1.5 * SR))).astype(np.float32), SR, subtype="PCM_16")
    return path


def _copy(checkpoint, tmp_path, name="damaged"):
    return shutil.copytree(checkpoint, tmp_path / name)


def _poison(directory, value):
    """Set one element of one weight in `directory`'s model.safetensors to `value`."""
    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    weights = load_file(path)
    weights[POISONED].view(-1)[3] = value
    save_file(weights, path, metadata=metadata)


def _truncate(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:keep])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("echox: error: ")
    return lines[-1]


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_at_load_naming_it(checkpoint, tmp_path, value):
    damaged = _copy(checkpoint, tmp_path)
    _poison(damaged, value)
    with pytest.raises(ValueError, match=f"{damaged} is damaged: its weight {POISONED} holds 1 NaN or infinite"):
        EchoXForSpeechToSpeech.from_pretrained(damaged)  # the path every load takes (AutoModel, pipeline, load_echox)
    with pytest.raises(ValueError, match=POISONED):
        load_echox(str(damaged))


def test_finite_checkpoint_loads(checkpoint):
    model, _ = load_echox(checkpoint)
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values() if tensor.is_floating_point())


def test_finite_weights_whose_sum_overflows_are_accepted(checkpoint):
    model = EchoXForSpeechToSpeech.from_pretrained(checkpoint).to(torch.float16)
    weight = model.state_dict()[POISONED]
    weight.fill_(60000.0)  # finite in float16, but the sum is not
    assert torch.isinf(weight.sum())
    model.check_finite_weights("big")
    weight.view(-1)[7] = float("inf")
    with pytest.raises(ValueError, match=f"big is damaged: its weight {POISONED} holds 1 NaN or infinite"):
        model.check_finite_weights("big")


@pytest.mark.parametrize("keep", [50, 100_000, -10])
def test_truncated_weights_file_is_refused_naming_it(checkpoint, tmp_path, keep):
    damaged = _copy(checkpoint, tmp_path)
    weights = os.path.join(damaged, "model.safetensors")
    _truncate(weights, keep if keep > 0 else os.path.getsize(weights) + keep)
    with pytest.raises(OSError, match=f"weights file {weights} is damaged or truncated"):
        load_echox(str(damaged))


def test_truncated_shard_of_a_sharded_checkpoint_is_named(checkpoint, tmp_path):
    model, processor = load_echox(checkpoint)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="500KB")
    processor.save_pretrained(sharded)
    with open(os.path.join(sharded, "model.safetensors.index.json"), encoding="utf-8") as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    assert len(shards) > 1
    _truncate(os.path.join(sharded, shards[1]), 1000)
    with pytest.raises(OSError, match=f"{shards[1]} is damaged or truncated"):
        load_echox(sharded)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("config.json", "not json", "damaged config.json"),
        ("config.json", '{"model_type": "echox", "text_config": 5}', "damaged config.json"),
        ("tokenizer.json", '{"model": {"type": "BPE"}}', "damaged processor"),
        ("model.safetensors.index.json", '{"weights": {}}', "not a valid safetensors index"),
    ],
)
def test_damaged_checkpoint_files_are_refused_naming_them(checkpoint, tmp_path, name, content, match):
    damaged = _copy(checkpoint, tmp_path)
    (damaged / name).write_text(content)
    with pytest.raises(OSError, match=match):
        load_echox(str(damaged))


def test_weights_that_do_not_fit_the_config_are_refused(checkpoint, tmp_path):
    damaged = _copy(checkpoint, tmp_path)
    config = json.loads((damaged / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="do not fit its config.json"):
        load_echox(str(damaged))
