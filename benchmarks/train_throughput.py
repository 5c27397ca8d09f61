"""
Training throughput of the three EchoX stages on this machine: samples/s of full training steps (collate → forward →
backward → AdamW step) with the same trainable sets as `training/stages/*`, with and without the frozen-encoder
feature cache (stage II reads no audio, so it has one figure). Prints JSON.

    python benchmarks/train_throughput.py                    # tiny random model, batch 4, 8 timed steps
    python benchmarks/train_throughput.py --size small --steps 4

The cache is warmed before timing (the steady state of a multi-epoch run); "without" computes the Whisper encoder on
every batch.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_echox.testing.random_checkpoint import build_random_echox  # noqa: E402
from training.stages.common import apply_lora, freeze_except  # noqa: E402
from training.stages.data import (  # noqa: E402
    EchoXDataCollator,
    EncoderStateCache,
    load_dialogue_dataset,
)
from training.stages.tiny_data import make_tiny_dataset  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]}
STAGE2_MODULES = ["echo_decoder.unit_embedding", "echo_decoder.projection", "echo_decoder.decoder", "echo_decoder.lm_head"]


def measure(model, collator, rows, batch_size, steps, warmup=1) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    batches = [rows[(i * batch_size) % len(rows) :][:batch_size] for i in range(steps + warmup)]
    for index, examples in enumerate(batches):
        if index == warmup:
            started = time.perf_counter()
        batch = collator(examples)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch_size * steps / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "size": args.size,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "samples_per_second": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        _, processor = build_random_echox(args.size)
        num_units = build_random_echox(args.size)[0].config.unit_vocab_size
        manifest = make_tiny_dataset(os.path.join(tmp, "data"), num_units=num_units, count=8)
        rows = list(load_dialogue_dataset(manifest))
        for stage in ("stage1_s2t", "stage2_t2c", "stage3_echo"):
            figures = {}
            for cached in (False, True) if stage != "stage2_t2c" else (False,):
                torch.manual_seed(0)
                model, processor = build_random_echox(args.size)
                cache = None
                if cached:
                    cache = EncoderStateCache(os.path.join(tmp, f"cache-{stage}"), model, processor.feature_extractor)
                    cache.warm([row["audio"] for row in rows])
                if stage == "stage1_s2t":
                    collator = EchoXDataCollator(processor, model.config, "s2t", encoder_cache=cache)
                    model = apply_lora(model, LORA, ["speech_adapter"])
                elif stage == "stage2_t2c":
                    collator = EchoXDataCollator(processor, model.config, "t2c")
                    freeze_except(model, STAGE2_MODULES)
                else:
                    collator = EchoXDataCollator(processor, model.config, "echo", encoder_cache=cache, segment_wise=True)
                    model = apply_lora(model, LORA, ["speech_adapter", "echo_decoder"])
                rate = measure(model, collator, rows, args.batch_size, args.steps)
                figures["with_feature_cache" if cached else ("no_audio" if stage == "stage2_t2c" else "without_feature_cache")] = round(rate, 3)
            if "with_feature_cache" in figures:
                figures["cache_speedup"] = round(figures["with_feature_cache"] / figures["without_feature_cache"], 2)
            results["samples_per_second"][stage] = figures
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
