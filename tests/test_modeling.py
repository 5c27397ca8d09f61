"""EchoXForSpeechToSpeech: save/load, Auto classes, remote code, losses and gradients, generation, bad input."""

import copy
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor

from modeling_echox import EchoXConfig, EchoXForSpeechToSpeech, EchoXProcessor
from modeling_echox.model.loading import check_checkpoint_dir, load_echox
from modeling_echox.model.segmentation import FaithfulSegmentation
from modeling_echox.model.speech_adapter import EchoXSpeechAdapter
from modeling_echox.testing.random_checkpoint import build_random_echox

SR = 16000


def tone(seconds, frequency=220.0, amplitude=0.1):
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * frequency * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def chirp(seconds, seed):
    rng = np.random.default_rng(seed)
    return (0.05 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


class EchoXModelTester:
    """Builds the tiny random EchoX and inputs for it (transformers' ModelTester pattern)."""

    def __init__(self):
        self.model, self.processor = build_random_echox("tiny", seed=0)

    def speech_inputs(self, clips=None, texts=None):
        clips = clips if clips is not None else [chirp(2.0, 1), tone(1.2, 330)]
        return self.processor(audio=clips, text=texts, sampling_rate=SR)

    def training_batch(self):
        """Two spoken dialogues with response labels, CTC transcripts and per-segment unit targets."""
        tokenizer = self.processor.tokenizer
        config = self.model.config
        prompts = self.speech_inputs(texts=["", "answer briefly"])
        responses = ["the capital of kenya is nairobi.", "monday comes after sunday."]
        rows, labels = [], []
        for row in range(2):
            prompt = prompts["input_ids"][row][prompts["attention_mask"][row].bool()]
            answer = torch.tensor(tokenizer(responses[row]).input_ids + [config.echo_config.unit_eos_token_id])
            rows.append(torch.cat([prompt, answer]))
            labels.append(torch.cat([torch.full_like(prompt, -100), answer]))
        width = max(len(r) for r in rows)
        pad = config.text_pad_token_id
        input_ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=pad) for r in rows])
        label_ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=-100) for r in labels])
        attention_mask = torch.stack([torch.arange(width) < len(r) for r in rows]).long()
        ctc = [tokenizer(t, add_special_tokens=False).input_ids for t in ["capital of kenya", "what comes after sunday"]]
        ctc_labels = torch.full((2, max(map(len, ctc))), -100)
        for row, ids in enumerate(ctc):
            ctc_labels[row, : len(ids)] = torch.tensor(ids)
        offset = config.unit_token_offset
        unit_labels = torch.full((2, 2, 6), -100)
        for row in range(2):
            for segment in range(2):
                units = torch.randint(0, config.unit_vocab_size, (4,), generator=torch.Generator().manual_seed(row * 2 + segment))
                unit_labels[row, segment, :5] = torch.cat([units + offset, torch.tensor([config.echo_config.unit_eos_token_id])])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": prompts["input_features"],
            "labels": label_ids,
            "ctc_labels": ctc_labels,
            "unit_labels": unit_labels,
        }


@pytest.fixture(scope="module")
def tester():
    return EchoXModelTester()


@pytest.fixture(scope="module")
def saved_dir(tester, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("echox-tiny"))
    tester.model.save_pretrained(directory)
    tester.processor.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------------ save / load / Auto
def test_save_load_round_trip_is_bit_exact(tester, saved_dir):
    reloaded = EchoXForSpeechToSpeech.from_pretrained(saved_dir).eval()
    original = tester.model.state_dict()
    loaded = reloaded.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key
    inputs = tester.speech_inputs()
    with torch.no_grad():
        assert torch.equal(tester.model(**inputs).logits, reloaded(**inputs).logits)
    a = tester.model.generate(**inputs)
    b = reloaded.generate(**inputs)
    assert torch.equal(a.sequences, b.sequences)
    assert a.unit_ids == b.unit_ids
    assert all(torch.equal(x, y) for x, y in zip(a.waveforms, b.waveforms))


def test_checkpoint_has_no_duplicate_or_dead_weights(saved_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(saved_dir, "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "unit_table" in keys
    assert not any(key.startswith("echo_decoder.decoder.embed_tokens") for key in keys)
    assert any(key.startswith("audio_tower.") for key in keys)
    assert any(key.startswith("vocoder.hifi_gan.") for key in keys)


def test_auto_classes_resolve(saved_dir):
    config = AutoConfig.from_pretrained(saved_dir)
    assert isinstance(config, EchoXConfig)
    assert type(AutoModel.from_pretrained(saved_dir)) is EchoXForSpeechToSpeech
    assert type(AutoModelForMultimodalLM.from_pretrained(saved_dir)) is EchoXForSpeechToSpeech
    assert type(AutoProcessor.from_pretrained(saved_dir)) is EchoXProcessor
    assert config.auto_map["AutoModel"] == "modeling_echox.EchoXForSpeechToSpeech"


def test_trust_remote_code_loads_without_the_package(tester, saved_dir, tmp_path):
    """A fresh interpreter that cannot import modeling_echox loads model and processor from the saved code."""
    inputs = tester.speech_inputs()
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    expected = tester.model.generate(**inputs).sequences
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_echox"] = None  # importing our package now fails
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({saved_dir!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({saved_dir!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = model.generate(**inputs)
        assert torch.equal(out.sequences, torch.load({str(tmp_path / "expected.pt")!r}))
        print("REMOTE-OK", len(out.waveforms))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK 2" in result.stdout


# ------------------------------------------------------------------------------------------------- losses / gradients
def _grad_reach(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    reached = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    echo_parts = {name.split(".")[1] for name, p in model.echo_decoder.named_parameters(prefix="x") if p.grad is not None}
    return output, reached, echo_parts


def test_stage1_speech_to_text_loss_and_gradients(tester):
    model = copy.deepcopy(tester.model).train()
    batch = tester.training_batch()
    batch.pop("unit_labels")
    output, reached, _ = _grad_reach(model, batch)
    assert torch.isfinite(output.lm_loss) and torch.isfinite(output.ctc_loss)
    assert torch.allclose(output.loss, output.lm_loss + 0.3 * output.ctc_loss)
    assert reached == {"speech_adapter", "language_model"}


def test_stage2_text_to_codec_loss_and_gradients(tester):
    model = copy.deepcopy(tester.model).train()
    batch = tester.training_batch()
    tokenizer = tester.processor.tokenizer
    texts = [["the capital of kenya", " is nairobi."], ["monday comes", " after sunday."]]
    echo_text_ids = torch.full((2, 2, 8), -100)
    for row in range(2):
        for segment in range(2):
            ids = tokenizer(texts[row][segment], add_special_tokens=False).input_ids[:8]
            echo_text_ids[row, segment, : len(ids)] = torch.tensor(ids)
    output, reached, echo_parts = _grad_reach(model, {"echo_text_ids": echo_text_ids, "unit_labels": batch["unit_labels"]})
    assert torch.isfinite(output.echo_loss) and output.loss is output.echo_loss
    assert reached == {"echo_decoder"}
    assert echo_parts == {"unit_embedding", "projection", "decoder", "lm_head"}  # not the denoiser: gold text in


def test_stage3_echo_loss_and_gradients(tester):
    model = copy.deepcopy(tester.model).train()
    batch = tester.training_batch()
    batch["echo_segment_lengths"] = torch.tensor([[4, 3], [3, 3]])
    output, reached, echo_parts = _grad_reach(model, batch)
    assert torch.isfinite(output.echo_loss) and torch.isfinite(output.denoise_loss)
    # segment-wise (the released mode): echo CE + denoising loss capped at 20 % of it
    cap = min(1.0, 0.2 * output.echo_loss.item() / output.denoise_loss.item())
    assert torch.allclose(output.loss, output.echo_loss + cap * output.denoise_loss)
    assert reached == {"speech_adapter", "language_model", "echo_decoder"}
    assert echo_parts == {"denoiser", "unit_embedding", "projection", "decoder", "lm_head"}
    # the text table the echo decoder reads is the LLM's output embedding, used frozen: no gradient from the echo loss
    model.zero_grad(set_to_none=True)
    model(**batch).echo_loss.backward()
    assert model.language_model.get_output_embeddings().weight.grad is None


def test_stage3_full_response_combines_losses_by_the_paper_rule(tester):
    model = copy.deepcopy(tester.model).train()
    batch = tester.training_batch()
    batch["unit_labels"] = batch["unit_labels"][:, :1]
    torch.manual_seed(0)
    output = model(**batch)
    s2t = output.lm_loss + 0.3 * output.ctc_loss
    cap = min(1.0, 0.2 * output.echo_loss.item() / output.denoise_loss.item())
    echo = output.echo_loss + cap * output.denoise_loss
    expected = 0.2 * s2t + 2.0 * echo if s2t.item() < 1.0 else s2t + echo
    assert torch.allclose(output.loss, expected)


def test_audio_tower_is_frozen_by_default(tester, saved_dir):
    assert not any(p.requires_grad for p in tester.model.audio_tower.parameters())
    for loaded in (EchoXForSpeechToSpeech.from_pretrained(saved_dir), AutoModel.from_pretrained(saved_dir)):
        assert not any(p.requires_grad for p in loaded.audio_tower.parameters())
        assert all(p.requires_grad for p in loaded.speech_adapter.parameters())


# ---------------------------------------------------------------------------------------------------------- generate
def test_batched_generate_equals_per_sample(tester):
    clips = [chirp(2.5, 3), tone(0.8, 440), chirp(1.1, 4)]
    batch = tester.speech_inputs(clips=clips, texts=["", "hello there", ""])
    together = tester.model.generate(**batch)
    for row, clip in enumerate(clips):
        alone = tester.model.generate(**tester.speech_inputs(clips=[clip], texts=[["", "hello there", ""][row]]))
        n = alone.sequences.shape[1]
        assert together.sequences[row, :n].tolist() == alone.sequences[0].tolist()
        assert together.segments[row] == alone.segments[0]
        assert together.unit_ids[row] == alone.unit_ids[0]
        assert torch.allclose(together.waveforms[row], alone.waveforms[0], atol=1e-5)


def test_greedy_generation_is_deterministic_and_stateless(tester):
    first = tester.model.generate(**tester.speech_inputs())
    tester.model.generate(**tester.speech_inputs(clips=[chirp(3.0, 9)]))  # an unrelated request in between
    second = tester.model.generate(**tester.speech_inputs())
    assert torch.equal(first.sequences, second.sequences)
    assert first.unit_ids == second.unit_ids


def test_generate_outputs_text_units_and_audio(tester):
    out = tester.model.generate(**tester.speech_inputs(), tokenizer=tester.processor.tokenizer)
    assert len(out.text) == 2 and all(isinstance(t, str) for t in out.text)
    assert out.sampling_rate == 16000
    for segments, seg_units, units, wav in zip(out.segments, out.segment_unit_ids, out.unit_ids, out.waveforms):
        assert segments and segments[0][0] == 0
        assert units == [u for seg in seg_units for u in seg]
        assert all(0 <= u < tester.model.config.num_units for u in units)
        assert wav.dtype == torch.float32 and wav.dim() == 1
        hop = tester.model.config.vocoder_config.hop_length
        assert wav.shape[0] % hop == 0 and wav.shape[0] >= hop * len(units)


def test_text_only_input_generates(tester):
    inputs = tester.processor(text=["what is the capital of france", "hi"])
    out = tester.model.generate(**inputs, tokenizer=tester.processor.tokenizer)
    assert out.sequences.shape[0] == 2 and len(out.waveforms) == 2


def test_generate_without_audio_output(tester):
    out = tester.model.generate(**tester.speech_inputs(), return_audio=False)
    assert out.waveforms is None and out.sequences.shape[0] == 2


# ------------------------------------------------------------------------------------------------------ the quirks
def test_faithful_frame_block_never_mixes_frames(tester):
    config = copy.deepcopy(tester.model.config)
    states = torch.randn(2, 40, config.audio_config.d_model)
    changed = states.clone()
    changed[0, :2] += 1.0  # the first adapter frame of clip 0
    for per_frame, others_unchanged in ((True, True), (False, False)):
        config.adapter_per_frame_block = per_frame
        torch.manual_seed(0)
        adapter = EchoXSpeechAdapter(config).eval()
        a, b = adapter.encode_frames(states), adapter.encode_frames(changed)
        assert not torch.allclose(a[0, 0], b[0, 0])
        assert torch.allclose(a[0, 1:], b[0, 1:], atol=1e-6) is others_unchanged
        assert torch.allclose(a[1], b[1], atol=1e-6)  # never across clips


def test_run_collapse_keeps_first_frame_of_every_run():
    ids = torch.tensor([[5, 5, 0, 0, 0, 7, 5, 5, 0]])
    keep = EchoXSpeechAdapter.run_starts(ids)
    assert keep.tolist() == [[True, False, True, False, False, True, True, False, True]]


def test_eot_is_masked_in_prompt_but_counts_for_positions(tester):
    model = tester.model
    inputs = tester.processor(text=["hello"])
    prompt = model._prepare_prompt(inputs["input_ids"], inputs["attention_mask"])
    ids = inputs["input_ids"][0]
    eot = model.config.text_pad_token_id
    assert (ids == eot).any()
    assert prompt.attention_mask[0][ids == eot].eq(0).all()
    assert prompt.attention_mask[0][ids != eot].eq(1).all()
    assert prompt.position_ids[0].tolist() == list(range(len(ids)))


def test_echo_prefix_quirk_id(tester):
    config = copy.deepcopy(tester.model.config)
    config.echo_config.prefix_quirk_id = 7
    decoder = type(tester.model.echo_decoder)(config)
    table = torch.randn(config.text_config.vocab_size, config.text_config.hidden_size)
    segment = torch.randn(3, config.text_config.hidden_size)
    with_quirk = decoder.segment_embeddings(segment, table)
    without = decoder.segment_embeddings(segment, table, with_quirk_id=False)
    n = len(config.echo_config.prefix_ids)
    assert with_quirk.shape[0] == without.shape[0] + 1
    assert torch.equal(with_quirk[n], table[7])
    assert torch.equal(with_quirk[:n], without[:n])


def test_segmentation_rule_matches_the_released_thresholds():
    rule = FaithfulSegmentation()
    scores = [0.0] * 60
    scores[22] = 0.5  # a peak above 0.1 after 20 tokens: cut after token 22
    scores[40] = 0.05  # a peak below the threshold and before 50 tokens: no cut
    texts = [""] * 120
    assert rule.split(scores, texts[:60]) == [(0, 23), (23, 60)]
    low = [0.01 * (i % 7) for i in range(120)]  # peaks at 6, 13, ... all below 0.1: cut at the first peak ≥ 50 tokens on
    spans = rule.split(low, texts)
    assert spans[0] == (0, 56) and spans[-1][1] == 120
    assert rule.split([0.9, 0.1], texts[:2]) == [(0, 2)]  # too short to cut: the remainder is one segment


def test_units_from_echo_ids_drops_text_and_out_of_range(tester):
    model = tester.model
    offset = model.config.unit_token_offset
    assert model.units_from_echo_ids([3, offset + 5, offset + 1, 2, offset + 63]) == [5, 1, 63]


# ------------------------------------------------------------------------------------------------------- bad input
def test_placeholder_and_clip_count_mismatch_raises(tester):
    inputs = tester.speech_inputs()
    with pytest.raises(ValueError, match="2 audio placeholder.*1 audio clip"):
        tester.model.generate(input_ids=inputs["input_ids"], input_features=inputs["input_features"][:1])
    with pytest.raises(ValueError, match="placeholder"):
        tester.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_bad_features_raise(tester):
    inputs = tester.speech_inputs()
    nan = inputs["input_features"].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tester.model.generate(input_ids=inputs["input_ids"], input_features=nan)
    with pytest.raises(ValueError, match="shape"):
        tester.model.generate(input_ids=inputs["input_ids"], input_features=inputs["input_features"][:, :, :1000])
    # the model is still usable after the failed requests
    assert tester.model.generate(**inputs).sequences.shape[0] == 2


def test_missing_checkpoint_files_raise_oserror(saved_dir, tmp_path):
    import shutil

    for name in ("model.safetensors", "unit_vocab.txt", "tokenizer.json"):
        broken = tmp_path / name.replace(".", "_")
        shutil.copytree(saved_dir, broken)
        os.remove(broken / name)
        with pytest.raises(OSError, match=name):
            load_echox(str(broken))
    with pytest.raises(OSError, match="not found"):
        check_checkpoint_dir(str(tmp_path / "nowhere"))


# -------------------------------------------------------------------------------------------------------------- CLI
def test_cli_init_random_and_speak(tmp_path):
    import soundfile

    from modeling_echox.cli import main

    out = tmp_path / "ckpt"
    assert main(["init-random", "--size", "tiny", "--out", str(out)]) == 0
    question = tmp_path / "q.wav"
    soundfile.write(question, chirp(1.5, 5), SR)
    answer = tmp_path / "a.wav"
    assert main(["speak", str(question), "-o", str(answer), "--model", str(out)]) == 0
    audio, rate = soundfile.read(answer)
    assert rate == 16000 and audio.ndim == 1
    assert main(["speak", str(tmp_path / "missing.wav"), "-o", str(answer), "--model", str(out)]) == 2


# ------------------------------------------------------------------------------------------------- other LLM families
def test_qwen2_llm_with_tied_embeddings(tester, tmp_path):
    """Any causal LM works as the LLM: a Qwen2 with tied input/output embeddings trains, generates and round-trips."""
    config = copy.deepcopy(tester.model.config).to_dict()
    text = config["text_config"]
    config["text_config"] = {
        "model_type": "qwen2",
        "vocab_size": text["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"],
    }
    torch.manual_seed(0)
    model = EchoXForSpeechToSpeech(EchoXConfig(**config))
    model.generation_config = tester.model.generation_config
    assert type(model.language_model).__name__ == "Qwen2ForCausalLM"
    lm = model.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    batch = tester.training_batch()
    output = model.train()(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = EchoXForSpeechToSpeech.from_pretrained(tmp_path).eval()
    assert reloaded.language_model.get_output_embeddings().weight is reloaded.language_model.get_input_embeddings().weight
    inputs = tester.speech_inputs()
    a, b = model.generate(**inputs), reloaded.generate(**inputs)
    assert torch.equal(a.sequences, b.sequences) and a.unit_ids == b.unit_ids


def test_generate_in_bfloat16(tester):
    model = copy.deepcopy(tester.model).to(torch.bfloat16)
    out = model.generate(**tester.speech_inputs())
    assert out.waveforms[0].dtype == torch.float32 and out.waveforms[0].numel() > 0


def test_speech_output_refuses_beam_search(tester):
    with pytest.raises(ValueError, match="num_beams"):
        tester.model.generate(**tester.speech_inputs(), num_beams=2)
    assert tester.model.generate(**tester.speech_inputs(), num_beams=2, return_audio=False).sequences.shape[0] == 2


# ------------------------------------------------------------------------------------------- prompt prefix cache
def test_prompt_prefix_cache_gives_the_same_answer_and_follows_the_weights():
    model, processor = build_random_echox("tiny", seed=3)
    inputs = processor(audio=[chirp(1.5, 9)], text=["answer briefly"], sampling_rate=SR)
    plain = model.generate(**inputs, reuse_prompt_prefix=False)
    assert model.prompt_prefix_cache._key is None
    cached = model.generate(**inputs)
    assert model.prompt_prefix_cache._key is not None
    again = model.generate(**inputs)  # served from the kept cache
    for output in (cached, again):
        assert output.sequences.tolist() == plain.sequences.tolist()
        assert output.unit_ids == plain.unit_ids
    key = model.prompt_prefix_cache._key
    with torch.no_grad():  # a training step changes the weights in place: the kept cache must not be reused
        for parameter in model.language_model.parameters():
            parameter.mul_(1.5)
    changed = model.generate(**inputs)
    assert model.prompt_prefix_cache._key != key
    assert changed.sequences.tolist() == model.generate(**inputs, reuse_prompt_prefix=False).sequences.tolist()


# ------------------------------------------------------------------------------------------ adapter_output="dictation"
@pytest.fixture(scope="module")
def dictating():
    tester = EchoXModelTester()
    tester.model.config.adapter_output = "dictation"  # the adapter reads it from the config
    return tester


def test_dictation_output_is_the_llm_embedding_of_the_collapsed_ctc_ids(dictating):
    model = dictating.model.eval()
    batch = dictating.speech_inputs()
    with torch.no_grad():
        speech = model.get_speech_embeddings(batch["input_features"])
        blank = model.config.audio_token_id
        for clip, vectors in enumerate(speech.speech_embeddings):
            ids = speech.ctc_logits[clip].argmax(-1)
            starts = EchoXSpeechAdapter.run_starts(ids[None])[0]
            dictation = ids[starts & (ids != blank)]
            assert len(dictation) == len(vectors) > 0
            torch.testing.assert_close(vectors, model.get_input_embeddings()(dictation))
        # the same ids without the CTC logits (inference: the screened argmax)
        quick = model.get_speech_embeddings(batch["input_features"], return_ctc_logits=False)
        for a, b in zip(quick.speech_embeddings, speech.speech_embeddings):
            torch.testing.assert_close(a, b)


def test_dictation_answers_exactly_as_the_llm_answers_the_dictated_text(dictating):
    model = dictating.model.eval()
    batch = dictating.speech_inputs(clips=[chirp(2.0, 1)], texts=[""])
    with torch.no_grad():
        speech = model.get_speech_embeddings(batch["input_features"])
    ids = speech.ctc_logits[0].argmax(-1)
    dictation = ids[EchoXSpeechAdapter.run_starts(ids[None])[0] & (ids != model.config.audio_token_id)]
    prompt = batch["input_ids"][0]
    at = int(torch.nonzero(prompt == model.config.audio_token_id)[0, 0])
    as_text = torch.cat([prompt[:at], dictation, prompt[at + 1 :]])[None]
    from_speech = model.generate(**batch, max_new_tokens=6, return_audio=False)
    from_text = model.generate(input_ids=as_text, attention_mask=torch.ones_like(as_text), max_new_tokens=6,
                               return_audio=False)
    assert from_speech.sequences[0, batch["input_ids"].shape[1] :].tolist() == \
        from_text.sequences[0, as_text.shape[1] :].tolist()


def test_dictation_trains_the_adapter_through_its_ctc_loss_only(dictating):
    model = dictating.model.train()
    model.zero_grad()
    model(**dictating.training_batch()).loss.backward()
    adapter = model.speech_adapter
    assert adapter.projector.weight.grad is not None and adapter.projector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.look_back.parameters())  # unused: the LLM reads token embeddings
    model.zero_grad()
    model.eval()


def test_adapter_output_is_checked():
    config = copy.deepcopy(EchoXModelTester().model.config).to_dict()
    config.update(adapter_output="frames")
    with pytest.raises(StrictDataclassFieldValidationError, match="adapter_output"):
        EchoXConfig(**config)
    config.update(adapter_output="dictation")
    adapter = EchoXSpeechAdapter(EchoXConfig(**config))
    with pytest.raises(ValueError, match="token_embedding"):
        adapter(torch.randn(1, 40, config["audio_config"]["d_model"]))


# ------------------------------------------------------------------------------------------------ crop_audio_padding
@pytest.fixture(scope="module")
def cropping():
    tester = EchoXModelTester()
    tester.model.config.crop_audio_padding = True
    return tester


def test_real_frame_lengths_match_the_clip_durations(cropping):
    clips = [chirp(2.5, 3), tone(0.8, 440), chirp(1.1, 4), chirp(6.0, 2)]
    features = cropping.speech_inputs(clips=clips, texts=[""] * len(clips))["input_features"]
    lengths = cropping.model.real_frame_lengths(features).tolist()
    for clip, length in zip(clips, lengths):
        assert abs(length - math.ceil(len(clip) / 320)) <= 1, (len(clip), length)


def test_cropped_clips_see_only_their_own_frames(cropping):
    clips = [chirp(2.5, 3), tone(0.8, 440), chirp(1.1, 4)]
    batch = cropping.speech_inputs(clips=clips, texts=["", "hello there", ""])
    speech = cropping.model.get_speech_embeddings(batch["input_features"])
    stack = cropping.model.config.adapter_frame_stack
    expected = [math.ceil((math.ceil(len(c) / 320) + 4) / stack) for c in clips]
    assert [abs(n - e) <= 1 for n, e in zip(speech.ctc_lengths.tolist(), expected)] == [True] * 3
    assert speech.ctc_logits.shape[1] == max(speech.ctc_lengths.tolist())
    # batch-invariant: every clip is answered as if it were alone
    together = cropping.model.generate(**batch)
    for row, clip in enumerate(clips):
        alone = cropping.model.generate(**cropping.speech_inputs(clips=[clip], texts=[["", "hello there", ""][row]]))
        n = alone.sequences.shape[1]
        assert together.sequences[row, :n].tolist() == alone.sequences[0].tolist()
        assert together.unit_ids[row] == alone.unit_ids[0]


def test_cropped_ctc_loss_uses_each_clips_length(cropping):
    batch = cropping.speech_inputs(clips=[chirp(2.5, 3), tone(0.8, 440)], texts=["", ""])
    speech = cropping.model.get_speech_embeddings(batch["input_features"])
    labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
    loss = cropping.model._ctc_loss(speech.ctc_logits, labels, speech.ctc_lengths)
    short = cropping.model._ctc_loss(speech.ctc_logits[1:, : speech.ctc_lengths[1]], labels[1:, :2])
    long = cropping.model._ctc_loss(speech.ctc_logits[:1], labels[:1])
    # "mean" reduction divides each clip's loss by its target length before averaging
    assert torch.allclose(loss, (long + short) / 2, atol=1e-5)


# ---------------------------------------------------------------------------------------------- encoder_window="clip"
def test_clip_window_needs_cropping():
    config = copy.deepcopy(EchoXModelTester().model.config).to_dict()
    config.update(encoder_window="clip", crop_audio_padding=False)
    with pytest.raises(ValueError, match="crop_audio_padding"):
        EchoXConfig(**config)


def test_window_prefix_encoding_equals_the_whisper_encoder(cropping):
    """Our prefix pass reuses WhisperEncoder's layers; on the whole window it must be WhisperEncoder's forward."""
    features = cropping.speech_inputs(clips=[chirp(1.5, 7)], texts=[""])["input_features"]
    with torch.no_grad():
        expected = cropping.model.audio_tower(features).last_hidden_state
        ours = cropping.model._encode_window_prefix(features)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_clip_window_encodes_each_clip_alone(cropping):
    model = cropping.model
    clips = [chirp(2.5, 3), tone(0.8, 440)]
    features = cropping.speech_inputs(clips=clips, texts=["", ""])["input_features"]
    model.config.encoder_window = "clip"
    try:
        with torch.no_grad():
            states = model.encode_audio(features)
            alone = model.encode_audio(features[1:])
            full = model.audio_tower(features).last_hidden_state
            answer = model.generate(**cropping.speech_inputs(clips=clips[1:], texts=[""]), return_audio=False)
    finally:
        model.config.encoder_window = "full"
    frames = [model.cropped_frames(n) for n in model.real_frame_lengths(features).tolist()]
    for clip, count in enumerate(frames):
        assert states[clip, count:].abs().max() == 0  # nothing past the encoded frames
        assert not torch.allclose(states[clip, :count], full[clip, :count], atol=1e-3)  # padding is no longer seen
    torch.testing.assert_close(states[1], alone[0])  # batch-invariant
    # a short clip's encoding is the window prefix pass over its own frames only
    torch.testing.assert_close(states[1, : frames[1]], model._encode_window_prefix(features[1:, :, : 2 * frames[1]])[0])
    assert answer.sequences.shape[1] > 0


def test_units_only_echo_head_trains_and_decodes():
    model, processor = build_random_echox("tiny", seed=1)
    config = copy.deepcopy(model.config)
    config.echo_config.units_only_head = True
    compact = EchoXForSpeechToSpeech(config).eval()
    units, offset, eos = config.unit_vocab_size, config.unit_token_offset, config.echo_config.unit_eos_token_id
    assert compact.echo_decoder.lm_head.out_features == units + 1
    index = torch.tensor([0, units - 1, units])
    assert compact.echo_decoder.ids_from_logit_index(index).tolist() == [offset, offset + units - 1, eos]
    targets = torch.tensor([offset + 3, eos, -100])
    assert compact.echo_decoder.logit_index_from_ids(targets).tolist() == [3, units, -100]
    with pytest.raises(ValueError, match="unit-language tokens"):
        compact.echo_decoder.logit_index_from_ids(torch.tensor([5]))
    segment = torch.randn(4, config.text_config.hidden_size)
    loss = compact._echo_loss([segment], [torch.tensor([offset + 1, offset + 2, eos])], [False], [torch.arange(4)])
    assert torch.isfinite(loss)
    (ids,) = compact.echo_decoder.generate([segment], compact.text_table, max_new_tokens=6)
    assert all(offset <= i < offset + units for i in ids)


def test_int8_quantization_answers_and_refuses_saving(tmp_path):
    from modeling_echox.model.quantization import quantize_int8

    model, processor = build_random_echox("tiny", seed=2)
    inputs = processor(audio=[chirp(1.5, 4)], text=[""], sampling_rate=SR)
    table = model.text_table.clone()
    quantize_int8(model.eval())
    layer = model.language_model.get_decoder().layers[0]
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(layer.self_attn.q_proj, quantized) and isinstance(layer.mlp.down_proj, quantized)
    assert isinstance(model.speech_adapter.ctc_head, quantized)
    assert not isinstance(model.language_model.get_output_embeddings(), quantized)
    assert torch.equal(model.text_table, table)  # the echo decoder's table stays in full precision
    output = model.generate(**inputs, tokenizer=processor.tokenizer, max_new_tokens=8)
    assert output.sequences.shape[1] > 0 and output.waveforms[0].numel() > 0
    with pytest.raises(ValueError, match="int8"):
        model.save_pretrained(tmp_path / "quantized")


def test_vocoder_stays_float32_when_loading_in_half_precision(saved_dir):
    model = EchoXForSpeechToSpeech.from_pretrained(saved_dir, dtype=torch.bfloat16)
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in model.vocoder.parameters()} == {torch.float32}
