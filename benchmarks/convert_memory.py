"""Peak memory of `convert_original` on a large synthetic released-EchoX checkpoint.

Builds a synthetic original (fp16, the released key names and shard index, the released 8×768 echo decoder; by default
≈2.7 GB in 5 shards) with the test suite's builder, converts it in a fresh subprocess and prints JSON with the
subprocess's peak RSS (its /proc VmHWM) next to the largest input and output shard. Everything is deleted afterwards.

    python benchmarks/convert_memory.py [--layers 22] [--shards 5] [--max-shard-size 600MB]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CHILD = r"""
import json, resource, sys, time
def rss_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
from modeling_echox.convert.original import convert_original
baseline = rss_kib("VmRSS")
started = time.perf_counter()
convert_original(*sys.argv[1:4], max_shard_size=sys.argv[4])
print(json.dumps({
    "baseline_rss_kib": baseline,
    # VmHWM is this process's own high-water mark (reset by exec); ru_maxrss is not: it starts from the forking
    # parent's peak, which here includes the synthetic checkpoint the parent built
    "peak_rss_kib": rss_kib("VmHWM"),
    "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "seconds": time.perf_counter() - started,
}))
"""


def _shard_sizes(directory):
    return [
        os.path.getsize(os.path.join(directory, name))
        for name in os.listdir(directory)
        if name.endswith(".safetensors")
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--shards", type=int, default=5, help="input shards")
    parser.add_argument("--max-shard-size", default="600MB", help="output shard limit")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()

    import torch
    from test_convert_original import build_synthetic_original

    root = tempfile.mkdtemp(prefix="echox-convert-memory-", dir=args.workdir)
    try:
        started = time.perf_counter()
        echox_dir, whisper_dir, _ = build_synthetic_original(
            root,
            hidden=args.hidden,
            intermediate=args.intermediate,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            whisper_dim=64,
            unit_model="medium",
            unit_vocab_size=2000,
            dtype=torch.float16,
            num_shards=args.shards,
        )
        build_seconds = time.perf_counter() - started
        out_dir = os.path.join(root, "converted")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, echox_dir, whisper_dir, out_dir, args.max_shard_size],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            sys.stderr.write(result.stderr)
            raise SystemExit(result.returncode)
        child = json.loads(result.stdout.strip().splitlines()[-1])
        inputs, outputs = _shard_sizes(echox_dir), _shard_sizes(out_dir)
        mib = 2**20
        report = {
            "input_total_mib": round(sum(inputs) / mib, 1),
            "input_shards": len(inputs),
            "largest_input_shard_mib": round(max(inputs) / mib, 1),
            "output_total_mib": round(sum(outputs) / mib, 1),
            "output_shards": len(outputs),
            "largest_output_shard_mib": round(max(outputs) / mib, 1),
            "rss_after_imports_mib": round(child["baseline_rss_kib"] / 1024, 1),
            "peak_rss_mib": round(child["peak_rss_kib"] / 1024, 1),
            "peak_rss_above_imports_mib": round((child["peak_rss_kib"] - child["baseline_rss_kib"]) / 1024, 1),
            "peak_rss_over_largest_input_shard": round(child["peak_rss_kib"] * 1024 / max(inputs), 3),
            "peak_above_imports_over_largest_input_shard": round(
                (child["peak_rss_kib"] - child["baseline_rss_kib"]) * 1024 / max(inputs), 3
            ),
            "conversion_seconds": round(child["seconds"], 1),
            "build_seconds": round(build_seconds, 1),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
