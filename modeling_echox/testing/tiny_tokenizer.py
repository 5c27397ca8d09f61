"""
A tiny, deterministic, offline byte-level BPE tokenizer that follows the Llama-3 conventions EchoX relies on.

The released EchoX uses the Llama-3 tokenizer: byte-level BPE, `<|begin_of_text|>` prepended to every encoding by a
`TemplateProcessing` post-processor, `<|eot_id|>` as end-of-turn *and* padding token, header tokens around role names,
and an extra `<audio_patch>` placeholder appended after the whole vocabulary. This module rebuilds the same structure at
toy size (≈ 500 ids) by training a BPE model in code on a small built-in English corpus, so that tests and tiny models
never need a download.

Layout of the ids (like Llama-3: the special tokens come after the BPE vocabulary, the speech placeholder is last):

    0 … 255               the 256 byte-level symbols
    256 … N-1             learned merges (N = `TINY_BPE_VOCAB_SIZE`)
    N … N+4               <|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>
    N+5                   <audio>   (the speech placeholder; the last id)
"""

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
AUDIO_TOKEN = "<audio>"

# In id order; `<audio>` is added last so that it gets the last id (as `<audio_patch>` = 128256 in the released model).
TINY_SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, AUDIO_TOKEN]

# Strings that must each encode to a single BPE token (after BOS): EchoX configs store their ids
# (prompt headers, the echo decoder's "speaker" header, the "." streaming-boundary token).
TINY_SINGLE_TOKEN_WORDS = ["\n", ".", "system", "user", "assistant", "speaker"]

TINY_BPE_VOCAB_SIZE = 500  # BPE part (bytes + merges); the full vocabulary adds the 6 special tokens

# The Llama-3 pre-tokenizer split pattern.
_LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A Llama-3 style chat template. String contents are used as is; list contents may hold
# `{"type": "audio"}` items (rendered as the `<audio>` placeholder) and `{"type": "text", "text": ...}` items.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set text = message['content'] %}"
    "{%- else %}"
    "{%- set text = namespace(value='') %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'audio' %}{%- set text.value = text.value + '" + AUDIO_TOKEN + "' %}"
    "{%- elif item['type'] == 'text' %}{%- set text.value = text.value + item['text'] %}{%- endif %}"
    "{%- endfor %}"
    "{%- set text = text.value %}"
    "{%- endif %}"
    "{%- set content = '" + START_HEADER_TOKEN + "' + message['role'] + '" + END_HEADER_TOKEN + "\n\n'"
    " + text | trim + '" + EOT_TOKEN + "' %}"
    "{%- if loop.index0 == 0 %}{%- set content = bos_token + content %}{%- endif %}"
    "{{- content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '" + START_HEADER_TOKEN + "assistant" + END_HEADER_TOKEN + "\n\n' }}"
    "{%- endif %}"
)

_ROLE_LINES = [
    "system",
    "user",
    "assistant",
    "speaker",
    "system\n",
    "user\n",
    "assistant\n",
    "speaker\n",
]

_QA_CORPUS = [
    "You are a helpful language and speech assistant.",
    "You are able to understand the speech content that the user provides.",
    "Assist the user with a variety of tasks using natural language.",
    "Recognize what the voice said and respond to it.",
    "What is the capital of France? The capital of France is Paris.",
    "What is the capital of Germany? The capital of Germany is Berlin.",
    "What is the capital of Italy? The capital of Italy is Rome.",
    "What is the capital of Spain? The capital of Spain is Madrid.",
    "What is the capital of Japan? The capital of Japan is Tokyo.",
    "What is the capital of Canada? The capital of Canada is Ottawa.",
    "What is the capital of Egypt? The capital of Egypt is Cairo.",
    "What is the capital of Kenya? The capital of Kenya is Nairobi.",
    "What is the capital of Peru? The capital of Peru is Lima.",
    "What is the capital of China? The capital of China is Beijing.",
    "What day comes after Monday? Tuesday comes after Monday.",
    "What day comes after Tuesday? Wednesday comes after Tuesday.",
    "What day comes after Wednesday? Thursday comes after Wednesday.",
    "What day comes after Thursday? Friday comes after Thursday.",
    "What day comes after Friday? Saturday comes after Friday.",
    "What day comes after Saturday? Sunday comes after Saturday.",
    "What day comes after Sunday? Monday comes after Sunday.",
    "How many days are in a week? There are seven days in a week.",
    "What is one plus one? One plus one is two.",
    "What is two plus two? Two plus two is four.",
    "What is three plus four? Three plus four is seven.",
    "What is five plus five? Five plus five is ten.",
    "What is six minus two? Six minus two is four.",
    "What is nine minus three? Nine minus three is six.",
    "What is two times three? Two times three is six.",
    "What is four times two? Four times two is eight.",
    "Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.",
    "The numbers 0 1 2 3 4 5 6 7 8 9 10 12 20 100 are numbers.",
    "Hello! How are you today? I am fine, thank you.",
    "Please tell me the answer. Sure, here is the answer.",
    "Can you help me? Yes, I can help you.",
    "The speaker said hello. The user asked a question. The assistant gave an answer.",
    "Thank you for your question. Have a nice day.",
]


def _training_corpus() -> list[str]:
    # Role names as standalone lines (no leading space), repeated so that BPE learns each one as a whole token.
    return _QA_CORPUS * 3 + _ROLE_LINES * 40


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """
    Train (in a fraction of a second) and return the tiny Llama-3 style tokenizer. Deterministic: every call, in any
    process, yields the same vocabulary, merges and ids.

    bos = `<|begin_of_text|>` (prepended to every `encode(..., add_special_tokens=True)`), eos = pad = `<|eot_id|>`,
    and `<audio>` is the last id.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)

    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)

    tokenizer.add_special_tokens(TINY_SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A:0",
        pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )

    for word in TINY_SINGLE_TOKEN_WORDS:
        pieces = tokenizer.encode(word, add_special_tokens=False).ids
        if len(pieces) != 1:  # pragma: no cover - guarded by the built-in corpus
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single token ({pieces}); extend the corpus.")
    if tokenizer.token_to_id(AUDIO_TOKEN) != tokenizer.get_vocab_size() - 1:  # pragma: no cover
        raise RuntimeError("tiny tokenizer: the audio placeholder must be the last id.")

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


__all__ = [
    "AUDIO_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "EOT_TOKEN",
    "END_HEADER_TOKEN",
    "START_HEADER_TOKEN",
    "TINY_BPE_VOCAB_SIZE",
    "TINY_CHAT_TEMPLATE",
    "TINY_SINGLE_TOKEN_WORDS",
    "TINY_SPECIAL_TOKENS",
    "build_tiny_tokenizer",
]
