"""
Targets of EchoX-mini's behaviour-aligned stage I: the text LLM's own greedy answer to each prompt's transcript —
SmolLM2-135M-Instruct with EchoX-mini's system prompt, `EchoXProcessor.build_prompt_ids(prompt, has_audio=False)`
exactly as `echox eval`'s text-only baseline asks it, at most `MAX_ANSWER_TOKENS` new tokens — stored as its token ids.
Answers that do not end within the budget are kept but marked unfinished. `answer_prompts` appends to `answers.jsonl`
after every batch, keyed by the prompt (`prompt_key`): a killed run resumes.
"""

import hashlib
import json
import os
import time

MAX_ANSWER_TOKENS = 48  # EchoX-mini's generation budget (its generation_config) and stage I's max_response_tokens


def prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def text_llm():
    """(SmolLM2-135M-Instruct with the `<audio>` token, as EchoX-mini's LLM; an `EchoXProcessor` with EchoX-mini's
    system prompt and chat template) — the text LLM whose answers are the targets."""
    from transformers import WhisperFeatureExtractor

    from modeling_echox.mini.assembly import SYSTEM_PROMPT
    from modeling_echox.mini.base_weights import load_smollm2
    from modeling_echox.model.processing_echox import EchoXProcessor

    llm, tokenizer = load_smollm2()
    llm.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    processor = EchoXProcessor(WhisperFeatureExtractor(), tokenizer, system_prompt=SYSTEM_PROMPT,
                               prompt_format="chat_template")
    return llm, processor


def greedy_answers(llm, processor, prompts: list[str], max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[dict]:
    """
    The LLM's greedy answers to text prompts (left-padded batch, the processor's text prompt):
    `{"answer", "ids", "finished"}` each, `ids` the generated tokens before the eos, `finished` whether it came.
    """
    import torch

    tokenizer = processor.tokenizer
    rows = [processor.build_prompt_ids(prompt, has_audio=False) for prompt in prompts]
    width = max(len(row) for row in rows)
    eos = llm.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    with torch.no_grad():
        output = llm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    answers = []
    for row in output[:, width:].tolist():
        finished = eos in row
        ids = row[: row.index(eos)] if finished else row
        answers.append({"answer": tokenizer.decode(ids, skip_special_tokens=True).strip(), "ids": ids,
                        "finished": finished})
    return answers


def read_answers(path: str) -> dict[str, dict]:
    """{prompt key: answer line} of an answers file (a line cut by a kill is ignored)."""
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[item["key"]] = item
    return done


def answer_prompts(prompts: list[str], path: str, llm=None, processor=None, batch_size: int = 16,
                   max_new_tokens: int = MAX_ANSWER_TOKENS, limit: int | None = None, verbose: bool = True) -> dict:
    """
    Answer every prompt not answered in `path` yet (`limit`: at most that many this run), appending one line per
    prompt after each batch. Prompts go shortest first (less padding). Returns {"answered", "done", "total"}.
    """
    done = read_answers(path)
    todo = sorted({p for p in prompts if prompt_key(p) not in done}, key=lambda p: (len(p), p))[:limit]
    if todo and llm is None:
        llm, processor = text_llm()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isfile(path) and os.path.getsize(path):  # a kill may have cut the last line: start on a fresh one
        with open(path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    started = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        answers = greedy_answers(llm, processor, batch, max_new_tokens)
        with open(path, "a", encoding="utf-8") as handle:
            for prompt, answer in zip(batch, answers):
                handle.write(json.dumps({"key": prompt_key(prompt), "prompt": prompt, **answer}) + "\n")
        if verbose:
            print(f"[behaviour] answered {start + len(batch)}/{len(todo)} in {time.perf_counter() - started:.0f} s",
                  flush=True)
    return {"answered": len(todo), "done": len(done) + len(todo), "total": len(set(prompts))}
