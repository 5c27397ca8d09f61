"""Streaming latency of an EchoX checkpoint on spoken questions, per segmentation mode; prints and writes JSON.

    python benchmarks/latency.py --model DIR --out latency.json [--questions N] [--manifest FILE.jsonl] [--int8]
                                 [--threads N] [--feature-threads N]

Questions come from `--manifest` (`{"audio": path}` lines, as `echox eval` uses) or are spoken by flite. For each
mode: first text token and first audio latency (from handing over the whole clip to the processor until the first
token / first audio sample is ready), total time, real-time factor (compute seconds / seconds of audio produced) and
the peak RSS of the process. Each clip runs through every mode in turn.

Threads are the caller's choice, as in any application: `--threads` sets torch's intra-op threads (the LLM decoding and
the voicing share them), and the Whisper features of each clip are computed on `--feature-threads` (default 1, the
caller's count restored afterwards): on more, the main thread's idle torch workers keep spinning after the features
and take the cores from the generation, which runs in another thread.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from threading import Thread

import numpy as np
import soundfile
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modeling_echox.model.loading import load_echox  # noqa: E402
from modeling_echox.model.streaming import EchoXAudioStreamer  # noqa: E402
from modeling_echox.torch_threads import torch_threads  # noqa: E402

QUESTIONS = [
    "what is the capital of france",
    "what is the capital of japan",
    "what is the capital of kenya",
    "what is the capital of peru",
    "what is the capital of canada",
    "what is the capital of egypt",
    "what is the capital of spain",
    "what is the capital of norway",
    "which continent is brazil in",
    "which continent is india in",
    "what day comes after monday",
    "what day comes before friday",
    "what month comes after march",
    "what month comes before december",
    "what is two plus three",
    "what is seven minus four",
    "what is six times two",
    "what is nine plus one",
    "what is the capital of italy",
    "what is the capital of chile",
]


def spoken_questions(count: int, directory: str) -> list[np.ndarray]:
    clips = []
    for index in range(count):
        path = os.path.join(directory, f"q{index}.wav")
        subprocess.run(["flite", "-voice", "slt", "-t", QUESTIONS[index % len(QUESTIONS)], "-o", path], check=True)
        clips.append(path)
    return clips


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def request(model, processor, clip: str, mode: str, max_new_tokens: int | None, feature_threads: int) -> dict:
    """One streamed answer: its first token / first audio / total times (ms) and audio seconds."""
    kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    audio, rate = soundfile.read(clip, dtype="float32")
    started = time.perf_counter()
    with torch_threads(feature_threads):
        inputs = processor(audio=audio, sampling_rate=rate)
    streamer = EchoXAudioStreamer()
    worker = Thread(
        target=model.generate,
        kwargs={**inputs, "processor": processor, "segmentation_mode": mode, "streamer": streamer, **kwargs},
    )
    worker.start()
    audio_ready, samples = None, 0
    for chunk in streamer:
        if audio_ready is None and len(chunk.audio):
            audio_ready = time.perf_counter()
        samples += len(chunk.audio)
    worker.join()
    finished = time.perf_counter()
    return {
        "first_token": ((streamer.first_token_time or finished) - started) * 1000,
        "first_audio": ((audio_ready or finished) - started) * 1000,
        "total": (finished - started) * 1000,
        "audio_seconds": samples / model.config.vocoder_config.sampling_rate,
    }


def summarize(records: list[dict]) -> dict:
    produced = sum(r["audio_seconds"] for r in records)
    compute = sum(r["total"] for r in records) / 1000
    return {
        "n": len(records),
        "first_text_token_ms_p50": percentile([r["first_token"] for r in records], 50),
        "first_text_token_ms_p90": percentile([r["first_token"] for r in records], 90),
        "first_audio_ms_p50": percentile([r["first_audio"] for r in records], 50),
        "first_audio_ms_p90": percentile([r["first_audio"] for r in records], 90),
        "first_audio_after_first_token_ms_p50": percentile([r["first_audio"] - r["first_token"] for r in records], 50),
        "total_ms_p50": percentile([r["total"] for r in records], 50),
        "audio_seconds": produced,
        "rtf": compute / produced if produced else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: $ECHOX_MODEL, else EchoX-mini)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--feature-threads", type=int, default=1,
                        help="torch threads for each clip's Whisper features (default 1; the count is restored after)")
    parser.add_argument("--int8", action="store_true", help="quantize the LLM layers to int8 (modeling_echox.model.quantization)")
    args = parser.parse_args()
    if args.feature_threads < 1:
        parser.error("--feature-threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from modeling_echox.mini.assembly import default_model_dir

    args.model = default_model_dir(args.model)
    model, processor = load_echox(args.model, int8=args.int8)
    with tempfile.TemporaryDirectory() as directory:
        if args.manifest:
            base = os.path.dirname(os.path.abspath(args.manifest))
            with open(args.manifest, encoding="utf-8") as handle:
                clips = [os.path.join(base, json.loads(line)["audio"]) for line in handle if line.strip()]
            # a seeded spread over the whole manifest (kinds and voices), not its first lines
            clips = [clips[i] for i in sorted(random.Random(0).sample(range(len(clips)), min(args.questions, len(clips))))]
        else:
            clips = spoken_questions(args.questions, directory)
        request(model, processor, clips[0], "faithful", args.max_new_tokens, args.feature_threads)  # warm-up
        modes = ("faithful", "fast")
        records = {mode: [] for mode in modes}
        # Every clip goes through both modes in turn, so that the machine's drift in speed hits them alike.
        for clip in clips:
            for mode in modes:
                records[mode].append(request(model, processor, clip, mode, args.max_new_tokens, args.feature_threads))
        result = {"model": os.path.abspath(args.model), "int8": args.int8, "torch_threads": torch.get_num_threads(),
                  "feature_threads": args.feature_threads}
        result.update({name: summarize(rows) for name, rows in records.items()})
        result["fast_over_faithful_first_audio"] = result["fast"]["first_audio_ms_p50"] / result["faithful"]["first_audio_ms_p50"]
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
