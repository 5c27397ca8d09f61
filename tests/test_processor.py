"""Tests of the tiny tokenizer and `EchoXProcessor` (prompt layout, batching, serialization, unit decoding)."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoProcessor, WhisperFeatureExtractor

from modeling_echox.model.configuration_echox import EchoXConfig
from modeling_echox.model.processing_echox import DEFAULT_SYSTEM_PROMPT, EchoXProcessor
from modeling_echox.model.unit_vocabulary import UNIT_VOCAB_FILE, EchoXUnitVocabulary
from modeling_echox.testing.tiny_tokenizer import (
    AUDIO_TOKEN,
    BOS_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    START_HEADER_TOKEN,
    TINY_SINGLE_TOKEN_WORDS,
    TINY_SPECIAL_TOKENS,
    build_tiny_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def feature_extractor():
    return WhisperFeatureExtractor(feature_size=80)


@pytest.fixture(scope="module")
def unit_vocabulary():
    return EchoXUnitVocabulary(["▁837_81_194", "902", "▁819", "5_1200", "7"], counts=[10, 9, 8, 7, 6])


@pytest.fixture()
def processor(feature_extractor, tokenizer, unit_vocabulary):
    return EchoXProcessor(feature_extractor, tokenizer, unit_vocabulary=unit_vocabulary)


@pytest.fixture(scope="module")
def ids(tokenizer):
    """Ids of the tiny tokenizer needed to spell out the §1.4 layout."""

    def single(text):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(pieces) == 1, (text, pieces)
        return pieces[0]

    return {
        "bos": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "sh": tokenizer.convert_tokens_to_ids(START_HEADER_TOKEN),
        "eh": tokenizer.convert_tokens_to_ids(END_HEADER_TOKEN),
        "eot": tokenizer.convert_tokens_to_ids(EOT_TOKEN),
        "audio": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        "nl": single("\n"),
        "system": single("system"),
        "user": single("user"),
        "assistant": single("assistant"),
    }


def _sine(rate=SR, seconds=1.0, freq=440.0, amplitude=0.5):
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _expected_layout(tokenizer, ids, text, system_prompt=DEFAULT_SYSTEM_PROMPT, audio=True):
    """The §1.4 token layout of echox-original.md, spelled out with the tiny tokenizer's ids."""
    bos, sh, eh, eot, nl = ids["bos"], ids["sh"], ids["eh"], ids["eot"], ids["nl"]

    def enc(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    layout = [bos]
    layout += [sh, bos, ids["system"], eh]
    layout += [bos, nl]
    layout += [bos, *enc(system_prompt), eot]
    layout += [sh, bos, ids["user"], eh]
    if audio:
        layout += [bos, nl, ids["audio"]]
        layout += [bos, *enc(text), eot]
    else:  # a text-only user turn has no "\n" (the released template)
        layout += [bos, *enc(text), eot]
    layout += [sh, bos, ids["assistant"], eh]
    layout += [bos, nl]
    return layout


def _expected_conversation(tokenizer, ids, turns, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """The released `gen_model_inputs` layout of several turns: (role, text, has_audio) each."""
    bos, sh, eh, eot, nl = ids["bos"], ids["sh"], ids["eh"], ids["eot"], ids["nl"]

    def enc(s):
        return [bos, *tokenizer(s, add_special_tokens=False)["input_ids"]]

    layout = [bos, sh, bos, ids["system"], eh, bos, nl, *enc(system_prompt), eot]
    for role, text, has_audio in turns:
        if role == "assistant":
            layout += [sh, bos, ids["assistant"], eh, bos, nl, *enc(text), eot]
        elif has_audio:
            layout += [sh, bos, ids["user"], eh, bos, nl, ids["audio"], *enc(text), eot]
        else:
            layout += [sh, bos, ids["user"], eh, *enc(text), eot]
    return layout + [sh, bos, ids["assistant"], eh, bos, nl]


def test_conversation_layout_and_clip_order(processor, tokenizer, ids):
    first = 0.05 * np.sin(np.arange(SR // 2) / 8).astype(np.float32)
    second = 0.1 * np.ones(SR, dtype=np.float32)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "array": first, "sampling_rate": SR}]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Rome."}]},
        {"role": "user", "content": [{"type": "audio", "audio": {"array": second, "sampling_rate": SR}},
                                     {"type": "text", "text": "Answer it."}]},
    ]
    out = processor(conversation=conversation)
    expected = _expected_conversation(
        tokenizer, ids,
        [("user", "", True), ("assistant", "Paris.", False), ("user", "And of Italy?", False),
         ("assistant", "Rome.", False), ("user", "Answer it.", True)],
        system_prompt="Be brief.",
    )
    assert out["input_ids"][0].tolist() == expected
    assert out["input_features"].shape[0] == 2
    single = processor(audio=second, sampling_rate=SR)["input_features"][0]
    assert torch.equal(out["input_features"][1], single)  # clips in turn order
    batch = processor(conversation=[conversation, conversation[1:2]])
    assert batch["input_features"].shape[0] == 3 and batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "user", "content": "a"}],
         "system message may only be the first"),
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"role": "user", "content": ""}], "needs audio, text, or both"),
        ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "unknown content part"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "exactly one of"),
        ([{"role": "assistant", "content": [{"type": "audio", "path": "a.wav"}]}, {"role": "user", "content": "x"}],
         "only user turns carry audio"),
        ([{"role": "user", "content": "say <audio>"}], "audio placeholder"),
    ],
)
def test_bad_conversations_are_refused(processor, conversation, message):
    with pytest.raises(ValueError, match=message):
        processor(conversation=conversation)


def test_conversation_excludes_audio_and_text(processor):
    with pytest.raises(ValueError, match="either `conversation` or"):
        processor(text="hi", conversation=[{"role": "user", "content": "hi"}])


def test_max_prompt_length_cuts_with_a_warning(feature_extractor, tokenizer, unit_vocabulary, caplog):
    long_text = " ".join(["word"] * 40)
    full = EchoXProcessor(feature_extractor, tokenizer)(text=long_text)["input_ids"][0].tolist()
    cut = EchoXProcessor(feature_extractor, tokenizer, max_prompt_length=len(full) - 5)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        row = cut(text=long_text)["input_ids"][0].tolist()
    assert row == full[: len(full) - 5] and "max_prompt_length" in caplog.text
    tiny = EchoXProcessor(feature_extractor, tokenizer, max_prompt_length=10)
    with pytest.raises(ValueError, match="drop an audio placeholder"):
        tiny(audio=0.1 * np.ones(SR, dtype=np.float32), sampling_rate=SR)


# ---------------------------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_llama3_conventions(tokenizer, ids):
    special = tokenizer.convert_tokens_to_ids(TINY_SPECIAL_TOKENS)
    assert special == list(range(500, 506))  # BPE part first (500), then the specials, <audio> last
    assert len(tokenizer) == 506
    assert ids["audio"] == len(tokenizer) - 1
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == EOT_TOKEN and tokenizer.pad_token == EOT_TOKEN
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == ids["eot"]
    # BOS is auto-prepended to every encode with special tokens (TemplateProcessing), as in Llama-3
    assert tokenizer("")["input_ids"] == [ids["bos"]]
    assert tokenizer("hello")["input_ids"][0] == ids["bos"]
    assert tokenizer("hello", add_special_tokens=False)["input_ids"][0] != ids["bos"]
    # byte-level symbols keep the Llama-3 / GPT-2 ids for "\n" and "."
    assert ids["nl"] == 198
    assert tokenizer(".", add_special_tokens=False)["input_ids"] == [13]
    for word in TINY_SINGLE_TOKEN_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tokenizer("\n" + AUDIO_TOKEN)["input_ids"] == [ids["bos"], ids["nl"], ids["audio"]]
    text = "What is the capital of France? Paris, 42 ünïcode!"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_tiny_tokenizer_is_deterministic(tokenizer):
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tiny_tokenizer_is_deterministic_across_processes(tokenizer):
    code = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1]);"
        "import importlib.util as u;"
        "spec = u.spec_from_file_location('tt', sys.argv[1] + '/modeling_echox/testing/tiny_tokenizer.py');"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(hashlib.sha256(m.build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    result = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    assert result.stdout.strip() == expected


def test_tiny_tokenizer_chat_template(tokenizer, ids):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": AUDIO_TOKEN + "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        f"{BOS_TOKEN}{START_HEADER_TOKEN}system{END_HEADER_TOKEN}\n\nBe brief.{EOT_TOKEN}"
        f"{START_HEADER_TOKEN}user{END_HEADER_TOKEN}\n\n{AUDIO_TOKEN}Hi{EOT_TOKEN}"
        f"{START_HEADER_TOKEN}assistant{END_HEADER_TOKEN}\n\n"
    )
    list_content = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Hi"}]},
    ]
    rendered_list = tokenizer.apply_chat_template(list_content, add_generation_prompt=False, tokenize=False)
    assert rendered_list == f"{BOS_TOKEN}{START_HEADER_TOKEN}user{END_HEADER_TOKEN}\n\n{AUDIO_TOKEN}Hi{EOT_TOKEN}"


# ---------------------------------------------------------------------------------------------- prompt layout


def test_llama3_pieces_layout_matches_reference(processor, tokenizer, ids):
    out = processor(audio=_sine(), text="What is the capital of France?", sampling_rate=SR)
    row = out["input_ids"][0].tolist()
    assert row == _expected_layout(tokenizer, ids, "What is the capital of France?")
    # structure checks: one BOS per piece (9 pieces), one placeholder, eot closes system and user turns
    assert row.count(ids["bos"]) == 9
    assert row.count(ids["audio"]) == 1
    eot_positions = [i for i, t in enumerate(row) if t == ids["eot"]]
    assert len(eot_positions) == 2
    assert row[eot_positions[0] + 1 : eot_positions[0] + 5] == [ids["sh"], ids["bos"], ids["user"], ids["eh"]]
    assert row[eot_positions[1] + 1 : eot_positions[1] + 5] == [ids["sh"], ids["bos"], ids["assistant"], ids["eh"]]
    assert row[-2:] == [ids["bos"], ids["nl"]]
    assert out["attention_mask"].tolist() == [[1] * len(row)]


def test_empty_text_gives_bos_eot_user_piece(processor, tokenizer, ids):
    row = processor(audio=_sine(), sampling_rate=SR)["input_ids"][0].tolist()
    assert row == _expected_layout(tokenizer, ids, "")
    audio_at = row.index(ids["audio"])
    assert row[audio_at - 2 : audio_at + 3] == [ids["bos"], ids["nl"], ids["audio"], ids["bos"], ids["eot"]]


def test_custom_system_prompt(feature_extractor, tokenizer, ids):
    processor = EchoXProcessor(feature_extractor, tokenizer, system_prompt="Answer briefly.")
    row = processor(audio=_sine(), text="Hi", sampling_rate=SR)["input_ids"][0].tolist()
    assert row == _expected_layout(tokenizer, ids, "Hi", system_prompt="Answer briefly.")


def test_text_only_request(processor, tokenizer, ids):
    out = processor(text="What day comes after Monday?")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    row = out["input_ids"][0].tolist()
    assert row == _expected_layout(tokenizer, ids, "What day comes after Monday?", audio=False)
    assert ids["audio"] not in row


def test_audio_features_and_lengths(processor):
    clips = [_sine(SR, 1.0), _sine(8000, 0.5), {"array": _sine(44100, 2.0), "sampling_rate": 44100}]
    out = processor(audio=clips[:2], text=["a", "b"], sampling_rate=SR)
    assert out["input_features"].shape == (2, 80, 3000)
    # one clip at 16 kHz, one at 8 kHz (via a dict), one at 44.1 kHz: all resampled to 16 kHz
    out = processor(audio=[clips[0], {"array": clips[1], "sampling_rate": 8000}, clips[2]], sampling_rate=SR)
    assert out["input_features"].shape == (3, 80, 3000)
    assert out["input_features"].dtype == torch.float32
    assert (out["input_ids"] == processor.audio_token_id).sum(dim=1).tolist() == [1, 1, 1]


def test_features_match_whisper_feature_extractor(processor, feature_extractor):
    wave = _sine(SR, 1.5)
    out = processor(audio=wave, sampling_rate=SR)
    reference = feature_extractor(wave, sampling_rate=SR, padding="max_length", return_tensors="pt").input_features
    torch.testing.assert_close(out["input_features"], reference)


def test_features_leave_torch_threads_to_the_caller(processor, monkeypatch):
    """Thread policy belongs to the application: the processor never changes torch's (process-wide) thread count."""
    counts = []
    extract = type(processor.feature_extractor).__call__

    def recording(self, *args, **kwargs):
        counts.append(torch.get_num_threads())
        return extract(self, *args, **kwargs)

    monkeypatch.setattr(type(processor.feature_extractor), "__call__", recording)
    monkeypatch.setattr(torch, "set_num_threads", lambda count: pytest.fail(f"set_num_threads({count}) called"))
    processor(audio=_sine(SR, 0.5), sampling_rate=SR)
    assert counts == [torch.get_num_threads()]


def test_audio_from_file_path(processor, tmp_path):
    path = tmp_path / "q.wav"
    pcm = np.round(np.stack([_sine(22050, 1.0), _sine(22050, 1.0)], axis=1) * 32767).astype(np.int16)
    sf.write(path, pcm, 22050, subtype="PCM_16")
    out = processor(audio=str(path), text="Answer.")
    assert out["input_features"].shape[0] == 1


def test_batch_left_padding(processor, tokenizer, ids):
    texts = ["What is the capital of Japan? Please answer in one word.", ""]
    out = processor(audio=[_sine(), _sine(seconds=0.5)], text=texts, sampling_rate=SR)
    input_ids, mask = out["input_ids"], out["attention_mask"]
    long_row, short_row = (_expected_layout(tokenizer, ids, t) for t in texts)
    width = len(long_row)
    pad = width - len(short_row)
    assert pad > 0
    assert input_ids.shape == (2, width) and mask.shape == (2, width)
    assert input_ids[0].tolist() == long_row
    assert input_ids[1].tolist() == [tokenizer.pad_token_id] * pad + short_row
    assert mask[0].tolist() == [1] * width
    assert mask[1].tolist() == [0] * pad + [1] * len(short_row)
    # padding is only on the left; eot tokens inside the prompt stay attended (mask 1)
    assert all(mask[1, i] == 1 for i in range(width) if i >= pad and input_ids[1, i] == ids["eot"])


def test_batch_right_padding_and_numpy_and_lists(processor, tokenizer, ids):
    out = processor(text=["Hello there, how are you today?", "Hi"], padding_side="right", return_tensors="np")
    assert isinstance(out["input_ids"], np.ndarray)
    short = _expected_layout(tokenizer, ids, "Hi", audio=False)
    assert out["input_ids"][1, : len(short)].tolist() == short
    assert (out["input_ids"][1, len(short) :] == tokenizer.pad_token_id).all()
    assert out["attention_mask"][1].tolist() == [1] * len(short) + [0] * (out["input_ids"].shape[1] - len(short))
    as_lists = processor(text="Hi", audio=_sine(), sampling_rate=SR, return_tensors=None)
    assert isinstance(as_lists["input_ids"], list) and isinstance(as_lists["input_ids"][0], list)
    assert as_lists["input_features"].shape == (1, 80, 3000)


def test_mixed_batch_with_text_only_sample(processor, tokenizer, ids):
    out = processor(audio=[_sine(), None], text=["", "What is two plus two?"], sampling_rate=SR)
    assert out["input_features"].shape[0] == 1
    assert (out["input_ids"] == ids["audio"]).sum(dim=1).tolist() == [1, 0]
    n = len(_expected_layout(tokenizer, ids, "What is two plus two?", audio=False))
    assert out["input_ids"][1, -n:].tolist() == _expected_layout(tokenizer, ids, "What is two plus two?", audio=False)


def test_one_text_broadcast_to_all_clips(processor):
    out = processor(audio=[_sine(), _sine(seconds=0.3)], text="Answer.", sampling_rate=SR)
    assert out["input_ids"][0].tolist() == out["input_ids"][1].tolist()


def test_chat_template_format(feature_extractor, tokenizer, ids):
    processor = EchoXProcessor(feature_extractor, tokenizer, prompt_format="chat_template")
    out = processor(audio=_sine(), text="Hi", sampling_rate=SR)
    row = out["input_ids"][0].tolist()
    messages = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": AUDIO_TOKEN + "Hi"},
    ]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert row == list(expected["input_ids"])
    assert row.count(ids["bos"]) == 1 and row[0] == ids["bos"]
    assert row.count(ids["audio"]) == 1
    text_only = processor(text="Hi")["input_ids"][0].tolist()
    assert ids["audio"] not in text_only and text_only.count(ids["eot"]) == 2


def test_chat_template_override(feature_extractor, tokenizer):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    processor = EchoXProcessor(feature_extractor, tokenizer, prompt_format="chat_template", chat_template=template)
    row = processor(text="Hi")["input_ids"][0].tolist()
    assert tokenizer.decode(row, skip_special_tokens=False).endswith("user: Hi\nassistant:")


# ---------------------------------------------------------------------------------------------- errors


def test_input_errors(processor):
    with pytest.raises(ValueError, match="neither"):
        processor()
    with pytest.raises(ValueError, match="2 audio clip.*3 text"):
        processor(audio=[_sine(), _sine()], text=["a", "b", "c"], sampling_rate=SR)
    with pytest.raises(ValueError, match="1 audio clip.*2 text"):
        processor(audio=_sine(), text=["a", "b"], sampling_rate=SR)
    with pytest.raises(ValueError, match="placeholder"):
        processor(audio=_sine(), text=f"listen {AUDIO_TOKEN} to this", sampling_rate=SR)
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=AUDIO_TOKEN)
    with pytest.raises(ValueError, match="neither audio nor text"):
        processor(text="")
    with pytest.raises(ValueError, match="neither audio nor text"):
        processor(audio=[None], text=[""])
    with pytest.raises(ValueError, match="string or a list of strings"):
        processor(text=123)
    with pytest.raises(ValueError, match="empty list"):
        processor(audio=[], sampling_rate=SR)
    with pytest.raises(ValueError, match="list of samples"):
        processor(audio=[0.1, 0.2, 0.3], sampling_rate=SR)
    with pytest.raises(ValueError, match="padding_side"):
        processor(text="Hi", padding_side="middle")


def test_audio_errors_propagate(processor, tmp_path):
    with pytest.raises(ValueError, match="sampling rate is needed"):
        processor(audio=_sine())
    with pytest.raises(ValueError, match="silent"):
        processor(audio=np.zeros(SR, dtype=np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="too long.*31.00 s"):
        processor(audio=_sine(seconds=31.0), sampling_rate=SR)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(os.urandom(1024))
    with pytest.raises(OSError, match="corrupt.wav"):
        processor(audio=str(corrupt))


def test_max_audio_seconds(feature_extractor, tokenizer):
    processor = EchoXProcessor(feature_extractor, tokenizer, max_audio_seconds=1.0)
    with pytest.raises(ValueError, match="at most 1 s"):
        processor(audio=_sine(seconds=1.5), sampling_rate=SR)
    with pytest.raises(ValueError, match="max_audio_seconds"):
        EchoXProcessor(feature_extractor, tokenizer, max_audio_seconds=31.0)


def test_init_errors(feature_extractor, tokenizer):
    with pytest.raises(ValueError, match="prompt_format"):
        EchoXProcessor(feature_extractor, tokenizer, prompt_format="vicuna")
    with pytest.raises(ValueError, match="single token"):
        EchoXProcessor(feature_extractor, tokenizer, audio_token="<not_a_token>")
    with pytest.raises(ValueError, match="system prompt"):
        EchoXProcessor(feature_extractor, tokenizer, system_prompt=f"hi {AUDIO_TOKEN}")
    with pytest.raises(TypeError, match="EchoXUnitVocabulary"):
        EchoXProcessor(feature_extractor, tokenizer, unit_vocabulary=["1", "2"])


# ---------------------------------------------------------------------------------------------- decoding


def test_decode_skips_special_tokens_by_default(processor, tokenizer, ids):
    answer = tokenizer("The capital of France is Paris.")["input_ids"] + [ids["eot"]]
    assert processor.decode(answer) == "The capital of France is Paris."
    assert processor.decode(answer, skip_special_tokens=False).startswith(BOS_TOKEN)
    assert processor.batch_decode([answer, tokenizer("Hi")["input_ids"]]) == ["The capital of France is Paris.", "Hi"]


def test_unit_tokens(processor, unit_vocabulary):
    assert processor.unit_tokens == [
        "<|unit_▁837_81_194|>",
        "<|unit_902|>",
        "<|unit_▁819|>",
        "<|unit_5_1200|>",
        "<|unit_7|>",
    ]


def unit_processor(feature_extractor, tokenizer, unit_vocabulary, num_units=1000):
    return EchoXProcessor(
        feature_extractor, tokenizer, unit_vocabulary=unit_vocabulary, unit_token_offset=len(tokenizer), num_units=num_units
    )


def test_decode_units_with_word_marker_joins_unit_payloads(feature_extractor, tokenizer, unit_vocabulary, ids):
    processor = unit_processor(feature_extractor, tokenizer, unit_vocabulary)
    offset = len(tokenizer)
    digits = tokenizer("42", add_special_tokens=False)["input_ids"]
    sequence = [offset + 0, *digits, offset + 1, offset + 2, ids["eot"]]
    # "<|unit_▁837_81_194|>42<|unit_902|><|unit_▁819|><|eot_id|>" contains "▁": only the unit payloads count, joined
    # with nothing in between: "▁837_81_194902▁819"
    assert processor.decode_units(sequence) == [837, 81, 819]  # 194902 ≥ 1000 is dropped
    assert processor.decode_units(torch.tensor(sequence)) == [837, 81, 819]
    small = unit_processor(feature_extractor, tokenizer, unit_vocabulary, num_units=500)
    assert small.decode_units(sequence) == [81]  # units ≥ num_units are dropped


def test_decode_units_without_word_marker_takes_every_integer(feature_extractor, tokenizer, unit_vocabulary, ids):
    processor = unit_processor(feature_extractor, tokenizer, unit_vocabulary)
    offset = len(tokenizer)
    digits = tokenizer("42", add_special_tokens=False)["input_ids"]
    sequence = [offset + 1, *digits, offset + 3, offset + 4, ids["eot"]]
    # "<|unit_902|>42<|unit_5_1200|><|unit_7|><|eot_id|>": every integer (text ids included), 1200 ≥ 1000 dropped
    assert processor.decode_units(sequence) == [902, 42, 5, 7]
    assert processor.decode_units([]) == []


def test_decode_units_errors(feature_extractor, tokenizer, unit_vocabulary):
    processor = unit_processor(feature_extractor, tokenizer, unit_vocabulary)
    offset = len(tokenizer)
    with pytest.raises(ValueError, match="beyond the unit vocabulary"):
        processor.decode_units([offset + 5])
    with pytest.raises(ValueError, match="1-D"):
        processor.decode_units([[offset]])
    with pytest.raises(ValueError, match="negative"):
        processor.decode_units([-1])
    bare = EchoXProcessor(feature_extractor, tokenizer)
    with pytest.raises(ValueError, match="no unit vocabulary"):
        bare.decode_units([offset])
    with pytest.raises(ValueError, match="no unit vocabulary"):
        bare.unit_tokens
    without_offset = EchoXProcessor(feature_extractor, tokenizer, unit_vocabulary=unit_vocabulary)
    with pytest.raises(ValueError, match="unit_token_offset"):
        without_offset.decode_units([offset])
    with pytest.raises(ValueError, match="num_units must be a positive integer"):
        EchoXProcessor(feature_extractor, tokenizer, unit_vocabulary=unit_vocabulary, num_units=0)


def test_model_input_names(processor):
    assert processor.model_input_names == ["input_ids", "attention_mask", "input_features"]


# ---------------------------------------------------------------------------------------------- serialization


def test_save_and_load_round_trip(feature_extractor, tokenizer, unit_vocabulary, tmp_path):
    processor = EchoXProcessor(
        feature_extractor,
        tokenizer,
        unit_vocabulary=unit_vocabulary,
        system_prompt="Answer briefly.",
        max_audio_seconds=20.0,
    )
    processor.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json", UNIT_VOCAB_FILE} <= files
    assert EchoXUnitVocabulary.from_file(os.path.join(tmp_path, UNIT_VOCAB_FILE)).counts == unit_vocabulary.counts

    loaded = EchoXProcessor.from_pretrained(tmp_path)
    AutoProcessor.register(EchoXConfig, EchoXProcessor, exist_ok=True)
    auto_loaded = AutoProcessor.from_pretrained(tmp_path)
    for other in (loaded, auto_loaded):
        assert isinstance(other, EchoXProcessor)
        assert other.system_prompt == "Answer briefly."
        assert other.max_audio_seconds == 20.0
        assert other.prompt_format == "llama3_pieces"
        assert other.audio_token_id == processor.audio_token_id
        assert other.unit_tokens == processor.unit_tokens
        assert other.unit_vocabulary.pieces == unit_vocabulary.pieces
        assert other.tokenizer.get_vocab() == tokenizer.get_vocab()
        assert other.feature_extractor.feature_size == 80
        request = {"audio": [_sine(), _sine(seconds=0.4)], "text": ["Hi", ""], "sampling_rate": SR}
        expected, got = processor(**request), other(**request)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key])
        assert other(text="Hi")["input_ids"].tolist() == processor(text="Hi")["input_ids"].tolist()


def test_round_trip_without_unit_vocabulary_and_explicit_override(feature_extractor, tokenizer, tmp_path):
    EchoXProcessor(feature_extractor, tokenizer, prompt_format="chat_template").save_pretrained(tmp_path)
    assert UNIT_VOCAB_FILE not in os.listdir(tmp_path)
    loaded = EchoXProcessor.from_pretrained(tmp_path)
    assert loaded.unit_vocabulary is None and loaded.prompt_format == "chat_template"
    override = EchoXUnitVocabulary.from_num_units(3)
    with_units = EchoXProcessor.from_pretrained(tmp_path, unit_vocabulary=override)
    assert with_units.unit_tokens == ["<|unit_0|>", "<|unit_1|>", "<|unit_2|>"]


def test_truncate_long_audio_is_an_option(feature_extractor, tokenizer):
    long_clip = 0.1 * np.sin(np.arange(SR * 31) / 5).astype(np.float32)
    with pytest.raises(ValueError, match="too long"):
        EchoXProcessor(feature_extractor, tokenizer)(audio=long_clip, sampling_rate=SR)
    truncating = EchoXProcessor(feature_extractor, tokenizer, truncate_long_audio=True)
    features = truncating(audio=long_clip, sampling_rate=SR)["input_features"]
    expected = EchoXProcessor(feature_extractor, tokenizer)(audio=long_clip[: SR * 30], sampling_rate=SR)["input_features"]
    assert torch.equal(features, expected)
