"""Many listeners at once: N concurrent clients asking spoken questions, through EchoXServer and through the Space.

    python benchmarks/serving.py --model DIR --out serving.json [--clients 1,2,4,8] [--questions 40] [--mode fast]
                                 [--threads N] [--no-space]

For each number of clients N, N client threads ask `--questions` spoken questions between them, each client asking
its next question as soon as its last one is answered (a closed loop, as people waiting for an answer do). Twice:

- `engine`: in this process, through one `EchoXServer` (`server.submit(audio)`, iterating the request's chunks);
- `space`: through the Gradio Space (`spaces_demo/app.py`, started on 127.0.0.1 in a process of its own) with one
  `gradio_client.Client` per client (output files are not downloaded); each question starts a new conversation
  (`/new_conversation`, not timed), so that the Space answers the same single questions as the engine.

With one client, every question is also answered by `model.stream` alone right after its engine request (`lone` in
the engine's results, timed as benchmarks/latency.py times it), so that the two compare on the same machine state.

Per request: first audio (from handing over the question until the first chunk with audio reaches the client; for the
Space, the first update whose status counts some speech) and answer time (until the whole answer is there). Per N:
their p50 / p90 in ms, answers per second (answered requests / wall time of the run), errors (failed or timed-out
requests) and the peak resident memory of the serving process so far (MB). The machine's load average is recorded
next to each run. Every request has a timeout (`--request-timeout`), and the Space run only talks to 127.0.0.1.

Questions are spoken by flite (the questions of benchmarks/latency.py). `--threads` sets torch's intra-op threads for
both (the Space gets it as OMP_NUM_THREADS).
"""

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import soundfile
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import spoken_questions  # noqa: E402

from modeling_echox.model.loading import load_echox  # noqa: E402
from modeling_echox.serving import EchoXServer  # noqa: E402
from modeling_echox.testing.space_process import serve_space  # noqa: E402
from modeling_echox.torch_threads import torch_threads  # noqa: E402

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spaces_demo", "app.py")
SPEECH_SECONDS = re.compile(r"([0-9.]+) s of speech")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def summarize(records: list[dict], wall_s: float, peak_rss_mb: float, load_before, load_after) -> dict:
    answered = [r for r in records if r["error"] is None]
    return {
        "requests": len(records),
        "first_audio_ms_p50": percentile([r["first_audio_ms"] for r in answered if r["first_audio_ms"] is not None], 50),
        "first_audio_ms_p90": percentile([r["first_audio_ms"] for r in answered if r["first_audio_ms"] is not None], 90),
        "answer_ms_p50": percentile([r["answer_ms"] for r in answered], 50),
        "answer_ms_p90": percentile([r["answer_ms"] for r in answered], 90),
        "answers_per_s": len(answered) / wall_s,
        "errors": len(records) - len(answered),
        "error_messages": sorted({r["error"] for r in records if r["error"] is not None})[:5],
        "peak_rss_mb": peak_rss_mb,
        "wall_s": wall_s,
        "load_average_1min_before_after": [load_before, load_after],
    }


def run_clients(clients: int, questions: int, ask) -> tuple[list[dict], float]:
    """`clients` threads share `questions` requests (`ask(index)` → record), each asking again once answered."""
    records, lock, counter = [], threading.Lock(), iter(range(questions))

    def client():
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            record = ask(index)
            with lock:
                records.append(record)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------------ the engine
def timed(answer) -> dict:
    """
    Time one question: `answer()` asks it and iterates over its answer, yielding True for each piece that carries
    audio. First audio is when the first such piece arrives; an exception is counted as the request's error.
    """
    started = time.perf_counter()
    first_audio, error = None, None
    try:
        for spoke in answer():
            if first_audio is None and spoke:
                first_audio = time.perf_counter()
    except Exception as failure:  # counted, with its message
        error = f"{type(failure).__name__}: {failure}"
    finished = time.perf_counter()
    return {
        "first_audio_ms": None if first_audio is None else (first_audio - started) * 1000,
        "answer_ms": (finished - started) * 1000,
        "error": error,
    }


def engine_asker(server: EchoXServer, clips: list[tuple[np.ndarray, int]], mode: str, timeout: float):
    def ask(index: int) -> dict:
        audio, rate = clips[index % len(clips)]

        def answer():
            request = server.submit(audio, sampling_rate=rate, segmentation_mode=mode)
            while (chunk := request.get(timeout=timeout)) is not None:
                yield bool(chunk.audio.size)

        return timed(answer)

    return ask


def lone_asker(model, processor, clips: list[tuple[np.ndarray, int]], mode: str):
    """One question answered by `model.stream` alone, as benchmarks/latency.py times it (features on one thread)."""

    def ask(index: int) -> dict:
        audio, rate = clips[index % len(clips)]

        def answer():
            with torch_threads(1):
                inputs = processor(audio=audio, sampling_rate=rate)
            for chunk in model.stream(**inputs, processor=processor, segmentation_mode=mode):
                yield bool(chunk.audio.size)

        return timed(answer)

    return ask


def bench_engine(model, processor, clips, levels, questions, mode, timeout) -> dict:
    """
    The engine at each number of clients. With one client, each question is also answered by `model.stream` alone
    right after (`lone`: the same questions, interleaved, so that the machine's drift hits both alike).
    """
    results = {}
    with EchoXServer(model, processor, max_batch_size=max(levels), max_queue_size=0) as server:
        ask = engine_asker(server, clips, mode, timeout)
        lone = lone_asker(model, processor, clips, mode)
        ask(0), lone(0)  # warm-up
        for clients in levels:
            load_before = os.getloadavg()[0]
            if clients == 1:
                records, lone_records = [], []
                for index in range(questions):
                    records.append(ask(index))
                    lone_records.append(lone(index))
                wall = sum(record["answer_ms"] for record in records) / 1000
                lone_wall = sum(record["answer_ms"] for record in lone_records) / 1000
            else:
                records, wall = run_clients(clients, questions, ask)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            results[str(clients)] = summarize(records, wall, peak, load_before, os.getloadavg()[0])
            print(f"engine, {clients} client(s): {json.dumps(results[str(clients)])}", flush=True)
            if clients == 1:
                results["lone"] = summarize(lone_records, lone_wall, peak, load_before, os.getloadavg()[0])
                print(f"model.stream alone: {json.dumps(results['lone'])}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------------- the Space
def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


@contextmanager
def space_process(model_dir: str, threads: int | None, workdir: str):
    """The Space (`spaces_demo/app.py`) on a free loopback port with `threads` OpenMP threads; yields `(url, pid)`."""
    env = {"ECHOX_EXAMPLES_DIR": os.path.join(workdir, "examples")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with serve_space(APP, model_dir, os.path.join(workdir, "space.log"), env, startup_timeout=600.0) as served:
        yield served


def space_asker(url: str, paths: list[str], mode: str, timeout: float):
    from gradio_client import Client, handle_file

    local = threading.local()

    def ask(index: int) -> dict:
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        # a question of its own, as the engine's: the Space would otherwise keep this client's earlier exchanges in
        # the prompt (and encode their audio again); the reset is not timed
        local.client.predict(api_name="/new_conversation")

        def answer():
            started = time.perf_counter()
            job = local.client.submit(handle_file(paths[index % len(paths)]), mode, api_name="/respond")
            for _, _, status, _ in job:
                if time.perf_counter() - started > timeout:
                    job.cancel()
                    raise TimeoutError(f"no answer within {timeout} s")
                spoken = SPEECH_SECONDS.search(status or "")
                yield bool(spoken and float(spoken.group(1)) > 0)
            outputs = job.outputs()
            if not outputs or not str(outputs[-1][2]).startswith("done"):
                raise RuntimeError(f"the Space ended without an answer: {outputs[-1] if outputs else job.status()}")

        return timed(answer)

    return ask


def bench_space(model_dir, paths, levels, questions, mode, timeout, threads, workdir) -> dict:
    results = {}
    with space_process(model_dir, threads, workdir) as (url, pid):
        space_asker(url, paths, mode, timeout)(0)  # warm-up
        for clients in levels:
            ask = space_asker(url, paths, mode, timeout)  # fresh clients for each level
            load_before = os.getloadavg()[0]
            records, wall = run_clients(clients, questions, ask)
            results[str(clients)] = summarize(records, wall, _peak_rss_mb(pid), load_before, os.getloadavg()[0])
            print(f"space, {clients} client(s): {json.dumps(results[str(clients)])}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------------------ main
def targets(engine: dict, levels: list[int]) -> dict:
    """The serving targets, read off the engine's figures (most clients against one client)."""
    if 1 not in levels or len(levels) < 2:
        return {}
    one, most = engine["1"], engine[str(max(levels))]
    return {
        "clients": max(levels),
        "one_client_first_audio_ms_p50_over_lone": one["first_audio_ms_p50"] / engine["lone"]["first_audio_ms_p50"],
        "one_client_first_audio_within_10_percent_of_lone": one["first_audio_ms_p50"]
        <= 1.1 * engine["lone"]["first_audio_ms_p50"],
        "answer_ms_p50_over_one_client": most["answer_ms_p50"] / one["answer_ms_p50"],
        "answer_ms_p50_at_most_2x": most["answer_ms_p50"] <= 2 * one["answer_ms_p50"],
        "first_audio_ms_p50_at_most_1000": most["first_audio_ms_p50"] <= 1000,
        "no_errors": most["errors"] == 0,
        "answers_per_s_over_one_client": most["answers_per_s"] / one["answers_per_s"],
        "answers_per_s_at_least_3x": most["answers_per_s"] >= 3 * one["answers_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: $ECHOX_MODEL, else EchoX-mini)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--questions", type=int, default=40, help="requests per number of clients")
    parser.add_argument("--mode", default="fast", choices=("fast", "faithful"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request counts as failed")
    parser.add_argument("--no-space", action="store_true", help="measure the engine only")
    args = parser.parse_args()
    levels = sorted({int(n) for n in args.clients.split(",")})
    if not levels or levels[0] < 1 or args.questions < 1:
        parser.error("--clients needs positive numbers and --questions at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from modeling_echox.mini.assembly import default_model_dir

    args.model = default_model_dir(args.model)
    model, processor = load_echox(args.model)
    with tempfile.TemporaryDirectory() as workdir:
        paths = spoken_questions(20, workdir)
        clips = [soundfile.read(path, dtype="float32") for path in paths]
        result = {
            "model": os.path.abspath(args.model),
            "mode": args.mode,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "questions_per_level": args.questions,
        }
        result["engine"] = bench_engine(model, processor, clips, levels, args.questions, args.mode, args.request_timeout)
        result["targets"] = targets(result["engine"], levels)
        if not args.no_space:
            del model  # the Space loads its own
            result["space"] = bench_space(
                args.model, paths, levels, args.questions, args.mode, args.request_timeout, args.threads, workdir
            )
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
