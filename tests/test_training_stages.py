"""
Training stages 0 → I → II → III (training/stages): a tiny end-to-end chain (stage 0's unit language is the unit
vocabulary the later stages train on) whose losses go down, resuming, the data collator's label layout, the
frozen-encoder feature cache, and (slow) a SIGKILL mid-run and 2-process DDP on CPU.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from modeling_echox.testing.random_checkpoint import build_random_echox
from modeling_echox.units.unit_language import EchoXUnitLanguage
from training.stages import stage0_units, stage1_s2t, stage2_t2c, stage3_echo
from training.stages.common import (
    last_complete_checkpoint,
    load_config,
    load_model,
    load_trained_echox,
)
from training.stages.run_log import read_log
from training.stages.data import (
    IGNORE_INDEX,
    EchoXDataCollator,
    EncoderStateCache,
    load_dialogue_dataset,
    write_manifest,
)
from training.stages.tiny_data import make_tiny_dataset, synthesize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "training", "configs")


def losses(output_dir, key="loss"):
    return [entry[key] for entry in read_log(output_dir) if key in entry and "step" in entry and "event" not in entry]


def stage_config(module, name, tmp, data, **extra):
    overrides = {"train_manifest": data, "output_dir": str(tmp / name), "feature_cache_dir": str(tmp / "encoder_cache")}
    overrides.update(extra)
    return load_config(os.path.join(CONFIGS, f"{name}_tiny.json"), module.DEFAULTS, extra=overrides)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_data")), num_units=64, count=8)


def chain_manifest(data: str, tmp) -> tuple[str, str]:
    """
    Stage 0's input: each distinct response of the tiny data spoken (flite, else tones) as `answer_audio`. Returns
    (that manifest, the path the combined training manifest is written to after stage 0).
    """
    records = [json.loads(line) for line in open(data)]
    answers_dir = tmp / "answers"
    answers_dir.mkdir()
    answers = []
    for index, response in enumerate(sorted({record["response"] for record in records})):
        wav = synthesize(response, str(answers_dir / f"a{index:03d}.wav"), 100 + index)
        answers.append({"id": f"a{index:03d}", "response": response, "answer_audio": os.path.basename(wav)})
    return write_manifest(str(answers_dir / "answers.jsonl"), answers), str(tmp / "train.jsonl")


def combine_with_stage0(data: str, stage0_dir: str, out: str) -> str:
    """Tiny data's spoken questions + stage 0's unit-language targets of the same responses (the tiny data's made-up
    64-unit targets and segments dropped): the one manifest stages I, II and III train on."""
    base = os.path.dirname(os.path.abspath(data))
    units = {record["response"]: record["units"] for record in map(json.loads, open(os.path.join(stage0_dir, "dialogues.jsonl")))}
    records = []
    for record in map(json.loads, open(data)):
        record = {k: v for k, v in record.items() if k not in ("units", "segments")}
        record["audio"] = os.path.join(base, record["audio"])
        record["units"] = units[record["response"]]
        records.append(record)
    return write_manifest(out, records)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data):
    """Stage 0 → I → II → III on the tiny random model (in process; short runs with a high learning rate)."""
    tmp = tmp_path_factory.mktemp("chain")
    fast = {"max_steps": 8, "logging_steps": 2, "save_steps": 4}
    started = time.time()
    answers, train = chain_manifest(data, tmp)
    s0 = stage0_units.main(
        load_config(
            os.path.join(CONFIGS, "stage0_tiny.json"),
            stage0_units.DEFAULTS,
            extra={"manifests": [answers], "output_dir": str(tmp / "stage0"), "num_units": 16,
                   "unit_language": {"vocab_size": 32, "model_type": "bpe"}},
        )
    )
    stage0_dir = str(tmp / "stage0")
    train = combine_with_stage0(data, stage0_dir, train)
    units = {"units_from": stage0_dir}
    s1 = stage1_s2t.main(stage_config(stage1_s2t, "stage1", tmp, train, training_args=fast, **units))
    s2 = stage2_t2c.main(stage_config(stage2_t2c, "stage2", tmp, train, training_args={**fast, "max_steps": 20}, **units))
    s3 = stage3_echo.main(
        stage_config(
            stage3_echo,
            "stage3",
            tmp,
            train,
            model=s1["final"],
            echo_decoder_from=s2["final"],
            generation={"max_new_tokens": 10},
            training_args=fast,
            **units,
        )
    )
    return {"tmp": tmp, "train": train, "stage0": stage0_dir, "s0": s0, "s1": s1, "s2": s2, "s3": s3,
            "seconds": time.time() - started}


# ----------------------------------------------------------------------------------------------------- collator
def test_collator_label_layout_prompt_masked_response_and_eot_targeted(data):
    model, processor = build_random_echox("tiny")
    rows = list(load_dialogue_dataset(data))[:3]
    rows[1]["prompt"] = "answer briefly"
    collator = EchoXDataCollator(processor, model.config, stage="s2t")
    batch = collator(rows)
    tokenizer = processor.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert batch["input_features"].shape[0] == 3 and batch["ctc_labels"].shape[0] == 3
    for row, example in enumerate(rows):
        prompt = processor.build_prompt_ids(example["prompt"], has_audio=True)
        response = tokenizer(example["response"]).input_ids + [eot]  # BOS first, final eot, as the original
        length = len(prompt) + len(response)
        assert batch["input_ids"][row, :length].tolist() == prompt + response
        assert batch["labels"][row, : len(prompt)].eq(IGNORE_INDEX).all()  # the whole prompt is masked
        assert batch["labels"][row, len(prompt) : length].tolist() == response  # response + final eot are targets
        assert batch["labels"][row, length:].eq(IGNORE_INDEX).all()  # right padding
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        ctc = batch["ctc_labels"][row]
        assert ctc[ctc != IGNORE_INDEX].tolist() == tokenizer(example["transcript"], add_special_tokens=False).input_ids
    output = model(**batch)
    assert torch.isfinite(output.lm_loss) and torch.isfinite(output.ctc_loss)

    # stage II: per-segment gold text (BOS on the first) and unit targets ending with the echo eos
    t2c = EchoXDataCollator(processor, model.config, stage="t2c")(rows)
    first = rows[0]
    seg0 = t2c["echo_text_ids"][0, 0]
    assert seg0[seg0 != IGNORE_INDEX].tolist() == tokenizer(first["segment_texts"][0]).input_ids
    units0 = t2c["unit_labels"][0, 0]
    units0 = units0[units0 != IGNORE_INDEX].tolist()
    assert units0 == [model.config.unit_token_offset + u for u in first["segment_units"][0]] + [model.config.echo_config.unit_eos_token_id]

    # stage III segment-wise: the segment lengths cover the response tokens but the final eot
    echo = EchoXDataCollator(processor, model.config, stage="echo", segment_wise=True)(rows)
    produced = (echo["labels"] != IGNORE_INDEX).sum(-1)
    assert torch.equal(echo["echo_segment_lengths"].sum(-1), produced - 1)
    assert torch.isfinite(model(**echo).echo_loss)


def test_encoder_state_cache_matches_features_and_is_keyed(data, tmp_path):
    model, processor = build_random_echox("tiny")
    rows = list(load_dialogue_dataset(data))[:2]
    cache = EncoderStateCache(str(tmp_path / "cache"), model, processor.feature_extractor)
    plain = EchoXDataCollator(processor, model.config, stage="s2t")(rows)
    cached = EchoXDataCollator(processor, model.config, stage="s2t", encoder_cache=cache)(rows)
    assert "encoder_states" in cached and "input_features" not in cached and cache.misses == 2
    EchoXDataCollator(processor, model.config, stage="s2t", encoder_cache=cache)(rows)
    assert cache.hits == 2 and cache.misses == 2
    with torch.no_grad():
        a, b = model(**plain), model(**cached)
    assert torch.allclose(a.loss, b.loss, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-5)
    # another encoder (changed weights) → another key; a touched file → another key
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.audio_tower.parameters()).add_(1.0)
    assert EncoderStateCache(str(tmp_path / "cache"), other, processor.feature_extractor).file(rows[0]["audio"]) != cache.file(rows[0]["audio"])
    clipped = copy.deepcopy(model)  # the same encoder over clip-length windows → another key
    clipped.config.crop_audio_padding, clipped.config.encoder_window = True, "clip"
    assert EncoderStateCache(str(tmp_path / "cache"), clipped, processor.feature_extractor).file(rows[0]["audio"]) != cache.file(rows[0]["audio"])
    before = cache.file(rows[0]["audio"])
    os.utime(rows[0]["audio"], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache.file(rows[0]["audio"]) != before
    model.audio_tower.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        cache.get([rows[0]["audio"]])


def test_text_to_unit_language_is_the_denoiser_free_echo_path():
    model, _ = build_random_echox("tiny")
    ids = [[5, 6, 7], [8, 9]]
    units = stage3_echo.text_to_unit_language(model, ids)
    table = model.text_table
    raw = model.echo_decoder.generate([torch.nn.functional.embedding(torch.tensor(i), table) for i in ids], table, denoise=False)
    offset = model.config.unit_token_offset
    assert units == [[t - offset for t in row if t >= offset] for row in raw]
    denoised = model.echo_decoder.generate([torch.nn.functional.embedding(torch.tensor(i), table) for i in ids], table)
    assert denoised == model.echo_decoder.generate(
        [torch.nn.functional.embedding(torch.tensor(i), table) for i in ids], table, denoise=True
    )  # the default is unchanged


def test_stage3_whole_response_targets_and_batch(data, tmp_path):
    """Non-segment-wise stage III: one unit target per answer, CTC joins, the paper's combined loss is finite."""
    from training.stages.data import read_manifest

    model, processor = build_random_echox("tiny")
    records = read_manifest(data)[:2]
    cache = str(tmp_path / "targets.jsonl")
    report = stage3_echo.precompute_echo_targets(
        model, processor, records, cache, segment_wise=False, generation={"max_new_tokens": 4}
    )
    assert report["made"] + report["skipped_empty"] == 2
    again = stage3_echo.precompute_echo_targets(model, processor, records, cache, segment_wise=False)
    assert again["made"] == 0 and again["already_done"] == report["made"]  # resumable: nothing recomputed
    rows = list(load_dialogue_dataset(cache))
    assert all("units" in json.loads(line) for line in open(cache))
    batch = EchoXDataCollator(processor, model.config, stage="echo", with_ctc=True)(rows)
    assert "echo_segment_lengths" not in batch and batch["unit_labels"].shape[1] == 1 and "ctc_labels" in batch
    output = model(**batch)
    assert torch.isfinite(output.loss) and torch.isfinite(output.ctc_loss) and torch.isfinite(output.echo_loss)


def test_stage3_pseudo_labels_batched_equal_one_by_one(data, tmp_path):
    from training.stages.data import read_manifest

    model, processor = build_random_echox("tiny")
    records = read_manifest(data)[:3]
    made = {}
    for size in (1, 3):
        cache = str(tmp_path / f"targets{size}.jsonl")
        stage3_echo.precompute_echo_targets(
            model, processor, records, cache, segmentation_mode=["fast", "faithful"], batch_size=size,
            generation={"max_new_tokens": 10},
        )
        made[size] = {json.loads(line)["id"]: json.loads(line) for line in open(cache)}
    assert len(made[1]) == 6 and made[3] == made[1]


# --------------------------------------------------------------------------------------------------- end to end
def test_chain_losses_go_down(chain):
    for stage, key in (("stage1", "loss"), ("stage1", "ctc_loss"), ("stage2", "echo_loss"), ("stage3", "echo_loss")):
        curve = losses(str(chain["tmp"] / stage), key)
        assert len(curve) >= 3, (stage, key, curve)
        assert curve[-1] < 0.8 * curve[0], (stage, key, curve)
    print(f"chain 0→I→II→III: {chain['seconds']:.0f} s")


def test_chain_stage0_units_feed_the_model(chain):
    """Stage 0's outputs exist, and the stage-III model speaks stage 0's unit language (size and unit table)."""
    stage0 = chain["stage0"]
    for name in ("unit_kmeans.safetensors", "vocoder_units.jsonl", "dialogues.jsonl", "unit_language"):
        assert os.path.exists(os.path.join(stage0, name)), name
    assert chain["s0"]["answers"] == 8 and chain["s0"]["num_units"] == 16
    language = EchoXUnitLanguage.from_pretrained(os.path.join(stage0, "unit_language"))
    assert language.max_piece_length > 1  # real multi-unit pieces, not the one-token-per-unit fallback
    model, processor = load_trained_echox(str(chain["tmp"] / "stage3" / "final"))
    config = model.config
    assert config.unit_vocab_size == language.vocab_size == len(language.to_vocabulary())
    assert config.num_units == language.num_units and config.unit_max_piece_length == language.max_piece_length
    assert model.vocoder.config.num_units == language.num_units
    assert processor.unit_vocabulary.pieces == language.to_vocabulary().pieces
    records = [json.loads(line) for line in open(os.path.join(stage0, "dialogues.jsonl"))]
    vocoder_units = {item["audio"]: item["units"] for item in map(json.loads, open(os.path.join(stage0, "vocoder_units.jsonl")))}
    for record in records:
        expected = language.decode(record["units"])
        assert expected == vocoder_units[record["answer_audio"]]  # the stage-0 unit ids of this answer
        rows = model.unit_table[torch.tensor(record["units"])].flatten()
        assert rows[rows >= 0].tolist() == expected
        echo_ids = [config.unit_token_offset + u for u in record["units"]]
        assert model.units_from_echo_ids(echo_ids) == expected
    # the training manifest's targets are stage 0's, not the tiny data's
    train = {r["response"]: r["units"] for r in map(json.loads, open(chain["train"]))}
    assert all(train[r["response"]] == r["units"] for r in records)


def test_units_from_builds_random_models_and_refuses_other_checkpoints(chain, tmp_path):
    from modeling_echox.testing.random_checkpoint import write_random_checkpoint

    stage0 = chain["stage0"]
    language = EchoXUnitLanguage.from_pretrained(os.path.join(stage0, "unit_language"))
    model, processor = load_model({"model": "random:tiny", "units_from": stage0})
    assert model.config.unit_vocab_size == language.vocab_size and model.config.num_units == language.num_units
    assert model.unit_table.shape == (language.vocab_size, language.max_piece_length)
    assert processor.unit_vocabulary.pieces == language.to_vocabulary().pieces
    default, _ = build_random_echox("tiny")  # the default is unchanged: 64 units, one token each
    assert default.config.unit_vocab_size == default.config.num_units == 64 and default.config.unit_max_piece_length == 1
    load_model({"model": str(chain["tmp"] / "stage1" / "final"), "units_from": stage0})  # same unit language: fine
    other = write_random_checkpoint(str(tmp_path / "random"))
    with pytest.raises(ValueError, match="unit language"):
        load_model({"model": other, "units_from": stage0})
    with pytest.raises(ValueError, match="stage-0"):
        load_model({"model": "random:tiny", "units_from": str(tmp_path)})


def test_chain_outputs_are_loadable_checkpoints(chain):
    tmp = chain["tmp"]
    for stage in ("stage1", "stage2", "stage3"):
        assert os.path.isfile(tmp / stage / "loss.png")
        assert chain[f"s{stage[-1]}"]["global_step"] > 0
    # stage I: LoRA merged; stage III: LoRA kept as an adapter (its config's save_lora)
    assert not os.path.isdir(tmp / "stage1" / "final" / "lora_adapter")
    assert os.path.isdir(tmp / "stage3" / "final" / "lora_adapter")
    targets = [json.loads(line) for line in open(tmp / "stage3" / "echo_targets.jsonl")]
    assert len(targets) == 8 and all(sum(t["segment_lengths"]) == len(t["response_ids"]) for t in targets)
    model, processor = load_trained_echox(str(tmp / "stage3" / "final"))
    assert not hasattr(model, "peft_config")
    inputs = processor(audio=[targets[0]["audio"]], text=[""])
    out = model.generate(**inputs, max_new_tokens=4)
    assert len(out.waveforms) == 1
    # stage II changed only the echo decoder; stage III started from it
    s1, _ = load_trained_echox(str(tmp / "stage1" / "final"))
    s2, _ = load_trained_echox(str(tmp / "stage2" / "final"))
    assert torch.equal(s1.text_table, s2.text_table)
    start, _ = load_model({"model": "random:tiny", "units_from": chain["stage0"]})  # stage II's starting point
    assert s2.echo_decoder.lm_head.weight.shape == start.echo_decoder.lm_head.weight.shape
    assert not torch.equal(s2.echo_decoder.lm_head.weight, start.echo_decoder.lm_head.weight)


def test_ctc_warmup_trains_reloads_and_refuses_a_foreign_file(tmp_path, data):
    """The warm-up's saved adapter weights are reused on a rerun, and a file that does not fit the wrapped adapter
    (e.g. saved from an adapter outside peft) is refused instead of silently loading nothing."""
    from safetensors.torch import load_file, save_file

    from training.stages.common import apply_lora

    config = stage_config(stage1_s2t, "stage1", tmp_path, data)
    model, processor = load_model(config)
    collator = EchoXDataCollator(processor, model.config, stage="s2t")
    model = apply_lora(model, config["lora"], config["trainable_modules"]).get_base_model()
    dataset = load_dialogue_dataset(data)
    settings = {"steps": 3, "learning_rate": 1e-2, "batch_size": 2}
    out = str(tmp_path / "warm")
    summary = stage1_s2t.ctc_warmup(model, collator, dataset, settings, out)
    assert summary["ctc_warmup"] == 3 and summary["path"].endswith("ctc_warmup.safetensors")
    saved = load_file(os.path.join(out, "ctc_warmup.safetensors"))
    with torch.no_grad():
        for parameter in model.speech_adapter.parameters():
            parameter.zero_()
    assert stage1_s2t.ctc_warmup(model, collator, dataset, settings, out)["ctc_warmup"] == "loaded"
    trained = dict(model.speech_adapter.named_parameters())
    assert all(torch.equal(trained[name], tensor) for name, tensor in saved.items())
    save_file({name.replace("modules_to_save.default.", ""): t for name, t in saved.items()},
              os.path.join(out, "ctc_warmup.safetensors"))
    with pytest.raises(ValueError, match="not a warm-up of this model"):
        stage1_s2t.ctc_warmup(model, collator, dataset, settings, out)


def test_stage_resumes_from_its_last_checkpoint(tmp_path, data):
    """Two runs of stage II: the second (larger max_steps) continues from checkpoint-4, like a re-run after a kill."""
    config = stage_config(stage2_t2c, "stage2", tmp_path, data, training_args={"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    first = stage2_t2c.main(config)
    assert first["global_step"] == 4 and first["resumed_from"] is None
    assert last_complete_checkpoint(config["output_dir"]).endswith("checkpoint-4")
    config["training_args"]["max_steps"] = 7
    second = stage2_t2c.main(config)
    assert second["resumed_from"].endswith("checkpoint-4") and second["global_step"] == 7
    steps = [entry["step"] for entry in read_log(config["output_dir"]) if "loss" in entry and "event" not in entry]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # no step trained twice


# --------------------------------------------------------------------------------------------------------- slow
def _command(module, config, *sets):
    return [sys.executable, "-m", module, "--config", os.path.join(CONFIGS, config), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(tmp_path, data):
    out = tmp_path / "stage1"
    sets = [f"train_manifest={data}", f"output_dir={out}", "training_args.max_steps=10", "training_args.save_steps=3"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(_command("training.stages.stage1_s2t", "stage1_tiny.json", *sets), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while last_complete_checkpoint(str(out)) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = last_complete_checkpoint(str(out))
    assert killed_at is not None and not os.path.isdir(out / "final")
    result = subprocess.run(_command("training.stages.stage1_s2t", "stage1_tiny.json", *sets), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    starts = [e for e in read_log(str(out)) if e.get("event") == "start"]
    assert starts[-1]["resume_from"] is not None
    end = [e for e in read_log(str(out)) if e.get("event") == "end"][-1]
    assert end["global_step"] == 10 and os.path.isdir(out / "final")


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path, data):
    """`accelerate launch --num_processes 2` (gloo) with 2 × 2 samples gives the loss curve of one process with 4."""
    common = [f"train_manifest={data}", "disable_dropout=true", "training_args.max_steps=6", "training_args.logging_steps=1",
              f"feature_cache_dir={tmp_path / 'cache'}"]
    single = load_config(os.path.join(CONFIGS, "stage1_tiny.json"), stage1_s2t.DEFAULTS, common + [
        f"output_dir={tmp_path / 'one'}", "training_args.per_device_train_batch_size=4"])
    stage1_s2t.main(single)
    started = time.time()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "training", "accelerate", "ddp_cpu.yaml"), "--num_processes", "2",
               "-m", "training.stages.stage1_s2t", "--config", os.path.join(CONFIGS, "stage1_tiny.json")]
    for item in common + [f"output_dir={tmp_path / 'two'}", "training_args.per_device_train_batch_size=2"]:
        command += ["--set", item]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"2-process launch: {time.time() - started:.0f} s")
    start = [e for e in read_log(str(tmp_path / "two")) if e.get("event") == "start"][-1]
    assert start["world_size"] == 2
    one, two = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (one, two)


# ------------------------------------------------------------------------------------------------------ S-Align
def test_s_align_two_player_steps(data):
    """The discriminator step trains only the discriminator; the generator term reaches only the speech side."""
    from training.stages.s_align import SAlign

    model, processor = build_random_echox("tiny")
    model.train()
    batch = EchoXDataCollator(processor, model.config, stage="s2t")(list(load_dialogue_dataset(data))[:2])
    s_align = SAlign(model, {"generator_start_step": 0, "learning_rate": 1e-2})
    before = [p.detach().clone() for p in s_align.discriminator.parameters()]
    output = model(**batch)
    term, logs = s_align.losses(batch, global_step=0, training=True)
    assert set(logs) == {"s_align_d_loss", "s_align_g_loss"} and torch.isfinite(term)
    assert any(not torch.equal(a, b) for a, b in zip(before, s_align.discriminator.parameters()))  # d-step happened
    s_align.discriminator.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    term.backward()
    assert all(p.grad is None for p in s_align.discriminator.parameters())  # frozen during the generator loss
    reached = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"speech_adapter"}
    # before generator_start_step: discriminator step only
    model(**batch)
    s_align.settings["generator_start_step"] = 5
    term, logs = s_align.losses(batch, global_step=0, training=True)
    assert term is None and set(logs) == {"s_align_d_loss"}
    assert output.loss is not None


@pytest.mark.slow
def test_stage1_with_s_align_trains_saves_and_resumes(tmp_path, data):
    settings = {"enabled": True, "generator_start_step": 2, "learning_rate": 1e-3}
    config = stage_config(stage1_s2t, "stage1", tmp_path, data, s_align=settings,
                          training_args={"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    stage1_s2t.main(config)
    assert os.path.isfile(os.path.join(config["output_dir"], "checkpoint-4", "s_align.pt"))
    log = [e for e in read_log(config["output_dir"]) if "loss" in e and "event" not in e]
    assert all("s_align_d_loss" in e for e in log)
    assert [("s_align_g_loss" in e) for e in log] == [False, False, True, True]
    config["training_args"]["max_steps"] = 6
    second = stage1_s2t.main(config)
    assert second["resumed_from"].endswith("checkpoint-4") and second["global_step"] == 6


def test_stage3_pseudo_labels_cut_by_several_rules(data, tmp_path):
    """A list of segmentation modes: the answer is generated once and cut by each rule, one example per mode."""
    from training.stages.data import read_manifest

    model, processor = build_random_echox("tiny")
    model.generation_config.segment_min_tokens = 30  # faithful: one segment for these short answers; fast: cut after 3 tokens
    model.generation_config.fast_first_segment_tokens = 1
    records = read_manifest(data)[:2]
    cache = str(tmp_path / "targets.jsonl")
    report = stage3_echo.precompute_echo_targets(
        model, processor, records, cache, segmentation_mode=["fast", "faithful"], generation={"max_new_tokens": 12, "min_new_tokens": 12}
    )
    assert report["made"] == 4
    lines = {json.loads(line)["id"]: json.loads(line) for line in open(cache)}
    for record in records:
        fast, faithful = lines[record["id"] + "#fast"], lines[record["id"] + "#faithful"]
        assert fast["response_ids"] == faithful["response_ids"]  # one generation, two cuts
        assert len(faithful["segment_lengths"]) == 1 and sum(fast["segment_lengths"]) == len(fast["response_ids"])
    again = stage3_echo.precompute_echo_targets(model, processor, records, cache, segmentation_mode=["fast", "faithful"])
    assert again["made"] == 0


def test_stage3_pseudo_labels_from_a_labeler(data, tmp_path):
    """`labeler` (e.g. a TTS voice) labels each segment's text instead of the stage-II echo decoder."""
    from training.stages.data import read_manifest

    model, processor = build_random_echox("tiny")
    model.generation_config.fast_first_segment_tokens = 1
    records = read_manifest(data)[:2]
    asked = []

    def labeler(texts):
        asked.extend(texts)
        return [[len(text) % model.config.unit_vocab_size, 1] for text in texts]

    cache = str(tmp_path / "targets.jsonl")
    stage3_echo.precompute_echo_targets(model, processor, records, cache, segmentation_mode="fast", labeler=labeler,
                                        generation={"max_new_tokens": 12, "min_new_tokens": 12})
    lines = [json.loads(line) for line in open(cache)]
    segments = [segment for line in lines for segment in line["segments"]]
    assert len(segments) > len(lines)  # the fast rule cut the answers
    assert [text for text, _ in segments] == asked
    assert [units for _, units in segments] == [[len(text) % model.config.unit_vocab_size, 1] for text in asked]


def test_stage3_read_aloud_examples(tmp_path):
    """Stage-II manifest items become text-only, teacher-forced stage-III examples labelled with their own units."""
    model, processor = build_random_echox("tiny")
    size = model.config.unit_vocab_size
    items = [{"id": f"t2c-{i}", "response": text, "units": [(3 * i + j) % size for j in range(5 + i)]}
             for i, text in enumerate(["the sky is blue", "two plus two is four", "hello there"])]
    manifest = write_manifest(str(tmp_path / "t2c.jsonl"), items)
    cache = str(tmp_path / "targets.jsonl")
    assert stage3_echo.append_read_aloud(model, processor, cache, manifest, limit=2) == {"read_aloud_made": 2}
    assert stage3_echo.append_read_aloud(model, processor, cache, manifest, limit=2) == {"read_aloud_made": 0}
    rows = [json.loads(line) for line in open(cache)]
    by_text = {item["response"]: item for item in items}
    for row in rows:
        item = by_text[row["response"]]
        assert row["audio"] is None and row["prompt"] == f"Say: {item['response']}"
        assert row["response_ids"] == processor.tokenizer(item["response"], add_special_tokens=False).input_ids
        assert row["segments"] == [[item["response"], item["units"]]]
        assert row["segment_lengths"] == [len(row["response_ids"])]
    batch = EchoXDataCollator(processor, model.config, stage="echo", segment_wise=True)(list(load_dialogue_dataset(cache)))
    assert "input_features" not in batch or batch["input_features"] is None
    output = model(**batch)
    assert torch.isfinite(output.echo_loss)
    items[0]["units"] = [size]
    with pytest.raises(ValueError, match="beyond"):
        stage3_echo.append_read_aloud(model, processor, cache, write_manifest(str(tmp_path / "bad.jsonl"), items))
