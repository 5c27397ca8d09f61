"""
Fine-tuning on your own data (training/finetune, `echox finetune`) and the TRL path of stages I and III
(training/stages/trl_trainer.py): TRL's `SFTTrainer` and `transformers.Trainer` give the same loss curve, EchoX's own
loss (CTC included) is what TRL optimizes, user data in each accepted form, the checkpoints and model card written,
clear errors for bad input, and (slow) `accelerate launch` with 2 CPU processes.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch

from modeling_echox.cli import main as echox
from modeling_echox.testing.random_checkpoint import build_random_echox, write_random_checkpoint
from training.finetune import finetune, user_records
from training.stages import stage1_s2t, stage3_echo
from training.stages.common import load_config, load_trained_echox
from training.stages.run_log import read_log
from training.stages.tiny_data import make_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "training", "configs")


def curve(output_dir, key="loss"):
    return [entry[key] for entry in read_log(output_dir) if key in entry and "event" not in entry]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny stage manifest: 8 flite-spoken questions (tones without flite) with their answers."""
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_data")), num_units=64, count=8)


@pytest.fixture(scope="module")
def user_jsonl(data):
    """The same clips as a user's JSONL: {"audio": relative path, "question": text, "answer": text}."""
    path = os.path.join(os.path.dirname(data), "mine.jsonl")
    with open(data) as source, open(path, "w") as out:
        for record in map(json.loads, source):
            out.write(json.dumps({"audio": record["audio"], "question": record["transcript"],
                                  "answer": record["response"]}) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("base") / "echox-tiny")
    write_random_checkpoint(path, size="tiny", seed=0)
    return path


def run_stage(module, name, out, trainer, **extra):
    config = load_config(os.path.join(CONFIGS, f"{name}_tiny.json"), module.DEFAULTS,
                         extra={"output_dir": str(out), "trainer": trainer, **extra})
    module.main(config)
    return str(out)


# ----------------------------------------------------------------------------------------------- TRL = Trainer
def test_stage1_on_trl_gives_the_trainer_loss_curve(tmp_path, data):
    """Same seed, same tiny stage-I run (LoRA + adapter, dropout on): SFTTrainer and Trainer log the same losses."""
    common = {"train_manifest": data, "feature_cache_dir": str(tmp_path / "cache"),
              "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]},
              "training_args": {"max_steps": 4, "logging_steps": 1, "save_steps": 100}}
    started = time.time()
    runs = {t: run_stage(stage1_s2t, "stage1", tmp_path / t, t, **common) for t in ("trainer", "trl")}
    print(f"two 4-step stage-I runs: {time.time() - started:.1f} s")
    starts = {trainer: next(e for e in read_log(out) if e.get("event") == "start") for trainer, out in runs.items()}
    assert starts["trl"]["trainer"] == "trl" and starts["trainer"]["trainer"] == "trainer"
    assert starts["trl"]["trainable"] == starts["trainer"]["trainable"]
    for key in ("loss", "lm_loss", "ctc_loss"):
        ours, theirs = curve(runs["trainer"], key), curve(runs["trl"], key)
        assert len(ours) == len(theirs) == 4
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, err_msg=key)
    lm, ctc, total = (np.array(curve(runs["trl"], key)) for key in ("lm_loss", "ctc_loss", "loss"))
    np.testing.assert_allclose(total, lm + 0.3 * ctc, rtol=1e-4)  # TRL trained CE + 0.3 CTC, not its LM-only loss


def test_stage3_on_trl_gives_the_trainer_loss_curve(tmp_path, data):
    """Stage III (pseudo labels made once, shared): the echo and denoising losses train the same on both trainers."""
    common = {"model": "random:tiny", "echo_decoder_from": None, "train_manifest": data,
              "feature_cache_dir": str(tmp_path / "cache"), "targets_cache": str(tmp_path / "targets.jsonl"),
              "generation": {"max_new_tokens": 6},
              "training_args": {"max_steps": 3, "logging_steps": 1, "save_steps": 100}}
    runs = {t: run_stage(stage3_echo, "stage3", tmp_path / t, t, **common) for t in ("trainer", "trl")}
    for key in ("loss", "echo_loss", "denoise_loss"):
        ours, theirs = curve(runs["trainer"], key), curve(runs["trl"], key)
        assert len(ours) == len(theirs) == 3 and all(value > 0 for value in theirs)
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, err_msg=key)


def test_under_trl_the_ctc_loss_alone_still_trains_the_adapter(tmp_path, data):
    """Batches without `labels`: EchoX's loss is 0.3 · CTC only, which SFTTrainer's fused LM head cannot compute."""
    from training.stages.common import lora_config
    from training.stages.data import EchoXDataCollator, load_dialogue_dataset
    from training.stages.trl_trainer import EchoXSFTTrainer, sft_config

    model, processor = build_random_echox("tiny", seed=0)
    collator = EchoXDataCollator(processor, model.config, stage="s2t")

    def ctc_only(examples):
        return {key: value for key, value in collator(examples).items() if key != "labels"}

    before = model.speech_adapter.projector.weight.detach().clone()
    config = {"output_dir": str(tmp_path / "run"),
              "training_args": {"max_steps": 2, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 100,
                                "per_device_train_batch_size": 4}}
    trainer = EchoXSFTTrainer(
        model=model, args=sft_config(config, ["ctc_labels"]), train_dataset=load_dialogue_dataset(data),
        data_collator=ctc_only, processing_class=processor,
        peft_config=lora_config({"r": 4, "alpha": 8, "dropout": 0.0}, ["speech_adapter.projector"]),
    )
    assert trainer.args.dataset_kwargs == {"skip_prepare_dataset": True} and not trainer.args.remove_unused_columns
    assert not trainer.args.activation_checkpointing and not trainer.args.bf16
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["ctc_loss"] > 0 and "lm_loss" not in entry for entry in logged)
    assert all(abs(entry["loss"] - 0.3 * entry["ctc_loss"]) < 1e-3 * entry["loss"] for entry in logged)
    trained = trainer.model.base_model.model.speech_adapter.projector.modules_to_save["default"].weight
    assert not torch.equal(trained.detach(), before)  # the CTC moved the adapter
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # no LM loss: the LoRA got no gradient


# ------------------------------------------------------------------------------------------------ echox finetune
def test_echox_finetune_writes_a_loadable_checkpoint_and_its_card(tmp_path, base, user_jsonl, capsys):
    from transformers import AutoModel, AutoProcessor

    out = tmp_path / "mine"
    code = echox(["finetune", "--model", base, "--data", user_jsonl, "--out", str(out), "--max-steps", "3",
                  "--set", "training_args.logging_steps=1"])
    assert code == 0, capsys.readouterr().err
    assert "-> " + str(out) in capsys.readouterr().err
    model = AutoModel.from_pretrained(str(out))
    assert type(model).__name__ == "EchoXForSpeechToSpeech"
    AutoProcessor.from_pretrained(str(out))
    tuned = dict(model.named_parameters())
    original = dict(AutoModel.from_pretrained(base).named_parameters())
    changed = {name for name in tuned if not torch.equal(tuned[name], original[name])}
    assert any("q_proj" in name for name in changed) and any("speech_adapter.projector" in name for name in changed)
    assert not any("ctc_head" in name or "echo_decoder" in name or "audio_tower" in name for name in changed)
    card = (out / "README.md").read_text()
    assert "stage I (speech → text)" in card and "SFTTrainer" in card and "8 spoken examples" in card
    assert len(curve(str(out / "training"))) == 3 and (out / "training" / "train.jsonl").is_file()
    records = [json.loads(line) for line in open(out / "training" / "train.jsonl")]
    assert all(os.path.isabs(r["audio"]) and r["transcript"] and r["response"] for r in records)


def test_save_adapter_keeps_a_peft_adapter_that_automodel_attaches(tmp_path, base, user_jsonl):
    from transformers import AutoModel

    out = tmp_path / "adapter"
    summary = finetune(base, user_jsonl, str(out), trainer="trainer", max_steps=2, save_adapter=True, lora_r=4,
                       learning_rate=1e-2)
    assert summary["global_step"] == 2 and summary["trainer"] == "trainer"
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    attached = AutoModel.from_pretrained(str(out)).eval()
    merged, _ = load_trained_echox(str(out))
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        reference = AutoModel.from_pretrained(base).eval()(input_ids=ids).logits
        a, b = attached(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - reference).abs().max() > 1e-4  # the LoRA is applied
    trained = attached.speech_adapter.projector.modules_to_save["default"].weight  # the adapter's trained copy
    torch.testing.assert_close(trained, merged.speech_adapter.projector.weight)
    assert not torch.equal(trained, AutoModel.from_pretrained(base).speech_adapter.projector.weight)
    assert "peft adapter" in (out / "README.md").read_text()


def test_stage3_finetune_trains_the_echo_decoder_on_its_own_answers(tmp_path, base, user_jsonl):
    from transformers import AutoModel

    out = tmp_path / "echo"
    summary = finetune(base, user_jsonl, str(out), stage=3, max_steps=2, learning_rate=1e-2,
                       overrides=["generation.max_new_tokens=6", "training_args.logging_steps=1"])
    assert summary["stage"] == 3 and summary["lora_r"] == 0 and summary["global_step"] == 2
    assert all(value > 0 for value in curve(str(out / "training"), "echo_loss"))
    targets = [json.loads(line) for line in open(out / "training" / "echo_targets.jsonl")]
    assert len(targets) == 8 and all(t["response_ids"] and t["segments"] for t in targets)
    tuned, original = AutoModel.from_pretrained(str(out)), AutoModel.from_pretrained(base)
    changed = {name for name, p in tuned.named_parameters() if not torch.equal(p, original.get_parameter(name))}
    assert changed and all(name.startswith("echo_decoder.") for name in changed)
    assert "stage III (echo)" in (out / "README.md").read_text()


def test_a_rerun_resumes_the_finetune(tmp_path, base, user_jsonl):
    out = str(tmp_path / "resumed")
    finetune(base, user_jsonl, out, max_steps=2, overrides=["training_args.save_steps=2"])
    second = finetune(base, user_jsonl, out, max_steps=3, overrides=["training_args.save_steps=2"])
    assert second["global_step"] == 3
    log = read_log(os.path.join(out, "training"))
    steps = [entry["step"] for entry in log if "loss" in entry and "event" not in entry]
    assert steps == [1, 2, 3]


# ------------------------------------------------------------------------------------------------------- your data
def _clip(path, seconds=0.8, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate)
    return str(path)


def test_user_data_in_every_form(tmp_path):
    import datasets

    clips = [_clip(tmp_path / f"c{i}.wav") for i in range(2)]
    texts = {"question": ["one", "two"], "answer": ["first.", "second."]}
    expected = [{"transcript": "one", "response": "first."}, {"transcript": "two", "response": "second."}]
    audio_dir = str(tmp_path / "audio")

    def check(records):
        assert [{k: r[k] for k in ("transcript", "response")} for r in records] == expected
        assert all(os.path.isfile(r["audio"]) for r in records)
        return records

    as_paths = datasets.Dataset.from_dict({"audio": clips, **texts})
    with_feature = as_paths.cast_column("audio", datasets.Audio())
    assert [r["audio"] for r in check(user_records(with_feature, audio_dir))] == clips  # the files themselves
    check(user_records(as_paths, audio_dir))
    embedded = datasets.Dataset.from_dict(
        {"audio": [{"bytes": open(c, "rb").read(), "path": os.path.basename(c)} for c in clips], **texts}
    ).cast_column("audio", datasets.Audio())
    written = check(user_records(embedded, audio_dir))
    assert all(r["audio"].startswith(audio_dir) for r in written)
    mtimes = [os.stat(r["audio"]).st_mtime_ns for r in written]
    check(user_records(embedded, audio_dir))
    assert [os.stat(r["audio"]).st_mtime_ns for r in written] == mtimes  # unchanged files are not rewritten
    arrays = datasets.Dataset.from_dict(
        {"audio": [{"array": soundfile.read(c)[0], "sampling_rate": 16000} for c in clips], **texts})
    check(user_records(arrays, audio_dir))
    with_feature.save_to_disk(str(tmp_path / "saved"))
    check(user_records(str(tmp_path / "saved"), audio_dir))
    datasets.DatasetDict({"train": with_feature}).save_to_disk(str(tmp_path / "saved_dict"))
    check(user_records(str(tmp_path / "saved_dict"), audio_dir))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"audio": os.path.basename(c), "transcript": q, "answer": a}) + "\n"
                             for c, q, a in zip(clips, texts["question"], texts["answer"])))
    check(user_records(str(jsonl), audio_dir))
    stage3 = user_records(datasets.Dataset.from_dict({"audio": clips}), audio_dir, stage=3)  # no texts needed
    assert [(r["transcript"], r["response"]) for r in stage3] == [("", ""), ("", "")]


def test_a_folder_that_is_no_saved_dataset_is_refused(tmp_path):
    (tmp_path / "clips").mkdir()
    with pytest.raises(ValueError, match="is not a saved datasets.Dataset"):
        user_records(str(tmp_path / "clips"), str(tmp_path / "audio"))
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"audio": ["x.wav"]})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="a 'train' split is needed"):
        user_records(str(tmp_path / "d"), str(tmp_path / "audio"))
    with pytest.raises(ValueError, match="the given dataset holds no examples"):
        user_records(datasets.Dataset.from_dict({"audio": [], "question": [], "answer": []}), str(tmp_path / "audio"))


def test_audio_soundfile_cannot_read_goes_to_the_datasets_decoder(tmp_path, monkeypatch):
    import datasets

    import training.finetune.user_data as user_data

    odd = datasets.Dataset.from_dict({"audio": [{"bytes": b"not audio at all", "path": "x.m4a"}],
                                      "question": ["q"], "answer": ["a"]}).cast_column("audio", datasets.Audio())
    monkeypatch.setattr(datasets.config, "TORCHCODEC_AVAILABLE", False)
    with pytest.raises(ValueError, match=r"row 0 of the given dataset: .*torchcodec\) is not installed"):
        user_records(odd, str(tmp_path / "audio"))
    monkeypatch.setattr(user_data, "_decode_with_datasets", lambda value: (np.full((1600, 1), 0.1, np.float32), 8000))
    record = user_records(odd, str(tmp_path / "audio"))[0]
    samples, rate = soundfile.read(record["audio"])
    assert rate == 8000 and len(samples) == 1600


@pytest.mark.parametrize(
    "lines, error",
    [
        ([], "holds no examples"),
        ([{"audio": "missing.wav", "transcript": "q", "answer": "a"}], r"line 1 of .*missing\.wav does not exist"),
        ([{"audio": "ok.wav", "transcript": "q"}], r"has no 'answer' key"),
        ([{"audio": "ok.wav", "answer": "a"}], r"has no 'transcript' or 'question' key"),
        ([{"audio": "ok.wav", "transcript": "q", "answer": "a"}, {"audio": "ok.wav", "transcript": "q"}],
         r"line 2 of .* has no 'answer'"),
        ([{"audio": "ok.wav", "transcript": " ", "answer": "a"}], r"line 1 of .* empty or non-text 'transcript'"),
        ([{"audio": "bad.wav", "transcript": "q", "answer": "a"}], r"bad\.wav is in a format soundfile cannot read"),
    ],
)
def test_bad_data_is_refused_naming_the_problem(tmp_path, lines, error):
    _clip(tmp_path / "ok.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....not a wav")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises((ValueError, OSError), match=error):
        user_records(str(path), str(tmp_path / "audio"))


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"--stage": "2"}, "echox: error: Unknown stage '2': choose 1 (speech → text) or 3 (echo training)."),
        ({"--trainer": "sft"}, "echox: error: Unknown trainer 'sft': choose one of trainer, trl."),
        ({"--lora-r": "0", "--save-adapter": None},
         "echox: error: save_adapter keeps a LoRA as an adapter, but there is none"),
        ({"--data": "nowhere.jsonl"}, "echox: error: The data nowhere.jsonl does not exist."),
        ({"--model": os.path.dirname(os.path.abspath(__file__))}, "echox: error: The model"),
        ({"--set": "no_such_field=1"}, "echox: error: Unknown config field(s): ['no_such_field']"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, base, user_jsonl, capsys, changes, error):
    options = {"--model": base, "--data": user_jsonl, "--out": str(tmp_path / "out"), **changes}
    argv = ["finetune", *[item for flag, value in options.items() for item in (flag, value) if item is not None]]
    assert echox(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(error) and len(err.splitlines()) == 1, err


def test_an_output_folder_holding_other_files_is_refused(tmp_path, base, user_jsonl):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds other files"):
        finetune(base, user_jsonl, str(tmp_path / "taken"))
    with pytest.raises(ValueError, match="must not be the model's folder"):
        finetune(base, user_jsonl, base)


def test_the_cli_imports_training_only_when_finetune_runs():
    code = ("import sys, modeling_echox.cli as cli; cli.build_parser(); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('training', 'trl')], sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_cli_finds_training_beside_the_package_it_runs_from(tmp_path):
    """As from an editable install: `modeling_echox` imported from the checkout, which is not on sys.path."""
    code = f"""
import importlib.util, os, sys
root = {ROOT!r}
assert root not in sys.path and importlib.util.find_spec("training") is None
spec = importlib.util.spec_from_file_location("modeling_echox", os.path.join(root, "modeling_echox", "__init__.py"),
                                              submodule_search_locations=[os.path.join(root, "modeling_echox")])
sys.modules["modeling_echox"] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from modeling_echox.cli import _import_finetune
finetune = _import_finetune()
assert finetune.__module__ == "training.finetune.finetune" and sys.path[0] == root
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_finetune_on_two_cpu_processes_matches_one(tmp_path, base, user_jsonl):
    """`accelerate launch` (gloo, 2 × 2 clips) of `echox finetune` on TRL gives the curve of one process with 4."""
    sets = ["--set", "disable_dropout=true", "--set", "training_args.logging_steps=1",
            "--set", f"feature_cache_dir={tmp_path / 'cache'}"]
    finetune(base, user_jsonl, str(tmp_path / "one"), max_steps=4, batch_size=4, overrides=sets[1::2])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "training", "accelerate", "ddp_cpu.yaml"), "--num_processes", "2",
               "-m", "modeling_echox.cli", "finetune", "--model", base, "--data", user_jsonl,
               "--out", str(tmp_path / "two"), "--max-steps", "4", "--batch-size", "2", *sets]
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"2-process finetune: {time.time() - started:.0f} s")
    start = [e for e in read_log(str(tmp_path / "two" / "training")) if e.get("event") == "start"][-1]
    assert start["world_size"] == 2 and start["trainer"] == "trl"
    one, two = curve(str(tmp_path / "one" / "training")), curve(str(tmp_path / "two" / "training"))
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-3)
    assert (tmp_path / "two" / "README.md").is_file() and (tmp_path / "two" / "model.safetensors").is_file()
