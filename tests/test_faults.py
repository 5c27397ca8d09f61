"""Faults that used to pass silently or end in a traceback: damaged checkpoints, cut files, bad output paths."""

import json
import os
import re
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
from modeling_echox.model.loading import load_echox
from modeling_echox.testing.random_checkpoint import write_random_checkpoint

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


# ---------------------------------------------------------------------------------------------- the command line


def test_cli_truncated_weights_one_line_and_exit_code(checkpoint, question, tmp_path):
    damaged = _copy(checkpoint, tmp_path)
    weights = os.path.join(damaged, "model.safetensors")
    _truncate(weights, os.path.getsize(weights) // 2)
    command = [sys.executable, "-m", "modeling_echox.cli", "speak", question, "-o", str(tmp_path / "a.wav"),
               "--model", str(damaged)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("ECHOX_DEBUG", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert _one_error_line(done.stderr) == (
        f"echox: error: The EchoX weights file {weights} is damaged or truncated (Error while deserializing header: "
        "incomplete metadata, file not fully covered)."
    )
    assert not (tmp_path / "a.wav").exists()


def test_cli_echox_debug_shows_the_traceback(question, tmp_path, monkeypatch):
    args = ["speak", question, "-o", str(tmp_path / "a.wav"), "--model", str(tmp_path / "none")]
    monkeypatch.setenv("ECHOX_DEBUG", "1")
    with pytest.raises(OSError, match="checkpoint directory not found"):
        main(args)
    monkeypatch.setenv("ECHOX_DEBUG", "0")
    assert main(args) == 2


def test_cli_non_finite_checkpoint_is_an_error(checkpoint, question, tmp_path, capsys):
    damaged = _copy(checkpoint, tmp_path)
    _poison(damaged, float("nan"))
    assert main(["speak", question, "-o", str(tmp_path / "a.wav"), "--model", str(damaged)]) == 2
    assert POISONED in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a.wav").exists()


def test_cli_multi_line_error_is_printed_on_one_line(checkpoint, question, tmp_path, capsys):
    damaged = _copy(checkpoint, tmp_path)
    (damaged / "config.json").write_text('{"model_type": "echox", "text_config": 5}')  # a multi-line validation error
    assert main(["speak", question, "-o", str(tmp_path / "a.wav"), "--model", str(damaged)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "damaged config.json" in line and "text_config" in line


def test_cli_truncated_question_is_refused_before_model_work(question, tmp_path, capsys):
    cut = tmp_path / "cut.wav"
    cut.write_bytes(open(question, "rb").read()[:30000])
    assert main(["speak", str(cut), "-o", str(tmp_path / "a.wav"), "--model", str(tmp_path / "none")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{cut} is truncated: its header declares 48000 bytes of audio data but only 29956 are present" in line


def test_cli_speak_creates_the_output_folder(checkpoint, question, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "answer.wav"
    assert main(["speak", question, "-o", str(out), "--model", checkpoint, "--max-new-tokens", "4"]) == 0
    audio, rate = soundfile.read(out)
    assert rate == SR and len(audio) > 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    "output, extra, match",
    [
        ("{tmp}", [], "is not an audio file name: it must end in .wav"),
        ("{tmp}/answer.xyz", [], "answer.xyz is not an audio file name"),
        ("{tmp}/answer.ogg", ["--stream"], r"answer.ogg is not an audio file name: .*\(--stream writes 16-bit PCM\)"),
        ("{tmp}/file/answer.wav", [], "Cannot create the output folder .*file: a file has that name"),
        ("{tmp}/file/sub/answer.wav", [], "Cannot create the output folder .*sub: Not a directory"),
        ("{tmp}/folder.wav", [], "folder.wav is a folder; give a file name"),
    ],
)
def test_cli_speak_refuses_a_bad_output_before_model_work(question, tmp_path, capsys, output, extra, match):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.wav").mkdir()
    args = ["speak", question, "-o", output.format(tmp=tmp_path), "--model", str(tmp_path / "none"), *extra]
    assert main(args) == 2  # the model directory does not exist: the output is checked first
    line = _one_error_line(capsys.readouterr().err)
    assert "checkpoint" not in line
    assert re.search(match, line), line


def test_cli_eval_refuses_a_folder_as_output_before_model_work(question, tmp_path, capsys):
    manifest = tmp_path / "qa.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": question, "answers": ["paris"]}) + "\n")
    assert main(["eval", "--model", str(tmp_path / "none"), "--manifest", str(manifest), "--out", str(tmp_path)]) == 2
    assert f"The output path {tmp_path} is a folder" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "args",
    [
        ["speak", "q.wav", "-o", "a.wav", "--max-new-tokens", "0"],
        ["speak", "q.wav", "-o", "a.wav", "--max-new-tokens", "-3"],
        ["speak", "q.wav", "-o", "a.wav", "--max-new-tokens", "many"],
        ["eval", "--manifest", "m.jsonl", "--out", "r.json", "--batch-size", "0"],
        ["eval", "--manifest", "m.jsonl", "--out", "r.json", "--limit", "-1"],
    ],
)
def test_cli_bad_counts_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "expected a positive integer" in err.splitlines()[-1]
