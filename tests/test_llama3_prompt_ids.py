"""The processor's `llama3_pieces` prompt against the released EchoX template, with the real Llama-3 vocabulary.

Meta's `llama-models` package (a `dev` extra, pinned) ships the Llama-3 tiktoken file `llama3/tokenizer.model`
(128,000 base64-encoded BPE ranks). It is read from the installed package without importing it (no tiktoken needed),
turned into a byte-level BPE tokenizer with transformers' `TikTokenConverter` (the conversion the Llama-3 `tokenizer.json`
was made with), given the 256 Llama-3 special tokens at 128000 … 128255 and `<audio_patch>` at 128256 (as the released
EchoX tokenizer has them), and `<|begin_of_text|>` before every encoding, as the Llama-3 post-processor does.

The expected ids are the released template (the original `gen_model_inputs`): every piece tokenized on its own, so each
carries its own BOS, with the standard Llama-3 ids 9125 "system", 882 "user", 78191 "assistant", 198 "\\n".
"""

import base64
import importlib.util
import os

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor
from transformers.convert_slow_tokenizer import TikTokenConverter

from modeling_echox import EchoXProcessor

LLAMA_MODELS = importlib.util.find_spec("llama_models")  # located, not imported: its own imports need tiktoken
pytestmark = pytest.mark.skipif(
    LLAMA_MODELS is None,
    reason="the Llama-3 vocabulary comes from the llama-models package (pip install 'echox[dev]'), not installed",
)

BOS, EOS, START_HEADER, END_HEADER, EOT = 128000, 128001, 128006, 128007, 128009
AUDIO_PATCH = 128256
SYSTEM, USER, ASSISTANT, NEWLINE = 9125, 882, 78191, 198
SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# The Llama-3.1 special tokens at 128000 … 128010; the rest of the 256 are reserved.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]


class _RanksFile(TikTokenConverter):
    """`TikTokenConverter` reading the rank file itself (`<base64 token> <rank>` per line) instead of through tiktoken."""

    @staticmethod
    def load_tiktoken_bpe(path):
        ranks = {}
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        return ranks


def llama3_vocabulary_file() -> str:
    path = os.path.join(list(LLAMA_MODELS.submodule_search_locations)[0], "llama3", "tokenizer.model")
    if not os.path.isfile(path):
        pytest.skip(f"llama-models has no Llama-3 vocabulary at {path}")
    return path


@pytest.fixture(scope="module")
def llama3_tokenizer():
    specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(LLAMA3_SPECIALS) + 3)]
    backend = _RanksFile(llama3_vocabulary_file(), extra_special_tokens=specials + ["<audio_patch>"]).converted()
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)]),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|eot_id|>"
    )
    assert backend.get_vocab_size(with_added_tokens=False) == 128000
    assert len(tokenizer) == 128257
    return tokenizer


@pytest.fixture(scope="module")
def processor(llama3_tokenizer):
    return EchoXProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=llama3_tokenizer,
        audio_token="<audio_patch>",
        prompt_format="llama3_pieces",
    )


def test_the_vocabulary_is_llama3(llama3_tokenizer):
    vocab = llama3_tokenizer.get_vocab()
    assert [vocab[token] for token in LLAMA3_SPECIALS] == list(range(BOS, BOS + len(LLAMA3_SPECIALS)))
    assert vocab["<|reserved_special_token_247|>"] == 128255 and vocab["<audio_patch>"] == AUDIO_PATCH
    pieces = {text: llama3_tokenizer(text).input_ids for text in ("system", "user", "assistant", "speaker", "\n", ".", "")}
    assert pieces == {
        "system": [BOS, SYSTEM], "user": [BOS, USER], "assistant": [BOS, ASSISTANT], "speaker": [BOS, 65576],
        "\n": [BOS, NEWLINE], ".": [BOS, 13], "": [BOS],
    }
    assert llama3_tokenizer("\n<audio_patch>").input_ids == [BOS, NEWLINE, AUDIO_PATCH]
    assert llama3_tokenizer("Hello world!").input_ids == [BOS, 9906, 1917, 0]
    assert llama3_tokenizer.decode(llama3_tokenizer(SYSTEM_PROMPT).input_ids[1:]) == SYSTEM_PROMPT


def _system_turn(tokenizer):
    return [BOS, START_HEADER, BOS, SYSTEM, END_HEADER, BOS, NEWLINE] + tokenizer(SYSTEM_PROMPT).input_ids + [EOT]


ASSISTANT_START = [START_HEADER, BOS, ASSISTANT, END_HEADER, BOS, NEWLINE]


@pytest.mark.parametrize("text", ["", "Recognize what the voice said and respond to it."])
def test_speech_turn_matches_the_released_template(processor, llama3_tokenizer, text):
    user = [START_HEADER, BOS, USER, END_HEADER, BOS, NEWLINE, AUDIO_PATCH] + llama3_tokenizer(text).input_ids + [EOT]
    expected = _system_turn(llama3_tokenizer) + user + ASSISTANT_START
    assert processor.build_prompt_ids(text, has_audio=True) == expected
    if not text:  # the empty user text is a lone BOS, as the original tokenizes it
        assert user[-3:] == [AUDIO_PATCH, BOS, EOT]


def test_text_only_turn_matches_the_released_template(processor, llama3_tokenizer):
    text = "What is the capital of France?"
    # the original's text-only user turn: header, then the text piece (BOS first), then eot
    user = [START_HEADER, BOS, USER, END_HEADER] + llama3_tokenizer(text).input_ids + [EOT]
    assert processor.build_prompt_ids(text, has_audio=False) == _system_turn(llama3_tokenizer) + user + ASSISTANT_START


def test_conversation_matches_the_released_template(processor, llama3_tokenizer):
    """Earlier turns as the released `gen_model_inputs` lays them out: speech turn, assistant answer, text turn."""
    turns = [
        {"role": "user", "content": [{"type": "audio", "path": "question.wav"}]},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
    ]
    from modeling_echox.model.conversation import read_conversation

    ids = processor.build_conversation_ids(read_conversation(turns, processor.audio_token))
    tok = llama3_tokenizer
    expected = _system_turn(tok)
    expected += [START_HEADER, BOS, USER, END_HEADER, BOS, NEWLINE, AUDIO_PATCH] + tok("").input_ids + [EOT]
    expected += [START_HEADER, BOS, ASSISTANT, END_HEADER, BOS, NEWLINE] + tok("Paris is the capital of France.").input_ids + [EOT]
    expected += [START_HEADER, BOS, USER, END_HEADER] + tok("And of Italy?").input_ids + [EOT]
    assert ids == expected + ASSISTANT_START
