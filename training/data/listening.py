"""
The listening corpus: broad read English (`training.data.listening_text`: tens of thousands of distinct words) spoken
by every TRAINING voice the machine offers, with tempo, pitch, room and noise augmentation, for the adapter's
dictation ("hearing first", `training.stages.hearing`) and stage I. A few hundred sentences are held out of it and
spoken, clean, by every voice reserved for evaluation (`tts_voices.RESERVED_VOICES`): the held-out read sentences
of the dictation WER. No training clip is ever spoken by a reserved voice (checked at import and when planning), and
none says the rarest word of a hearing probe of the open evaluation set (`unheard_probe_words`).

    python -m training.data.listening --qa build/data/qa.jsonl --out build/data/speech [--max-clips 4000]

The plan (every sentence → one training voice and its augmentation, in a seeded order) does not depend on
`--max-clips`: a larger value later speaks more of the same plan, so the corpus grows without redoing any clip.
Clips are spoken in chunks of `CHUNK_SIZE` plan entries; a chunk writes its wav files, then
`<out>/listening/chunks/<chunk>.jsonl` (its manifest lines and each engine's time), and a chunk whose manifest
exists is skipped: a killed run resumes where it stopped. A chunk is named by its index and a hash of its clip ids,
and a wav file by its voice and text, so a changed plan makes new chunks but reuses every clip already spoken. Writes

    <out>/listening.jsonl          training clips: {"id", "audio", "text", "voice", "source", "augment", "duration",
                                   "split": "train", "kind": "listening"} (audio paths relative to <out>)
    <out>/listening_heldout.jsonl  held-out read sentences in the reserved voices (clean; "split": "test")
    <out>/listening_stats.json     hours, clips, distinct words, voices, clips per second of each engine
"""

import argparse
import hashlib
import json
import os
import random
import time
from multiprocessing import get_context

import numpy as np

from . import synthesize, tts_voices
from .listening_text import SOURCES, listening_sentences
from .reading import held_out_words
from .spoken_qa import read_jsonl

# Every voice the machine offers for training: the spoken-QA training voices, flite's 8 kHz kal and the espeak-ng
# accents and variants that are not reserved.
LISTENING_VOICES = (*tts_voices.TRAIN_VOICES, "flite_kal",
                    *(f"espeak_{name}" for name in tts_voices.ESPEAK_VOICES
                      if f"espeak_{name}" not in tts_voices.RESERVED_VOICES))
RESERVED_VOICES = tts_voices.RESERVED_VOICES


def check_training_voices(voices) -> None:
    """ValueError unless every voice is known and none is reserved for evaluation (nor an espeak m3/f4 variant)."""
    unknown = [voice for voice in voices if voice not in tts_voices.VOICES]
    if unknown:
        raise ValueError(f"Unknown voices {unknown}; choose from {sorted(tts_voices.VOICES)}.")
    reserved = [voice for voice in voices if voice in RESERVED_VOICES
                or tts_voices.VOICES[voice][1].endswith(("+m3", "+f4"))]
    if reserved:
        raise ValueError(f"Voices {reserved} are reserved for evaluation and never speak training clips.")


check_training_voices(LISTENING_VOICES)

LISTEN_PROMPT = "Repeat exactly what I said."
CHUNK_SIZE = 200
HELD_OUT_SOURCES = ("fortunes", "templates")  # natural sentences; the coverage lines are word lists
ROOM_PROBABILITY = 0.4
RT60_RANGE = (0.15, 0.7)  # seconds
DIRECT_TO_REVERB_DB_RANGE = (0.0, 12.0)


# ---------------------------------------------------------------------------------------------------- augmentation
def draw_listening_augmentation(rng: random.Random) -> dict:
    """`synthesize.draw_augmentation` (tempo, pitch, noise, gain) plus a room (reverberation time, direct-to-reverb
    ratio, seed) with probability `ROOM_PROBABILITY`."""
    params = synthesize.draw_augmentation(rng)
    params["room"] = None
    if rng.random() < ROOM_PROBABILITY:
        params["room"] = {"rt60": round(rng.uniform(*RT60_RANGE), 3),
                          "drr_db": round(rng.uniform(*DIRECT_TO_REVERB_DB_RANGE), 1), "seed": rng.randrange(2**31)}
    return params


def room_response(rt60: float, drr_db: float, seed: int, rate: int = tts_voices.SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response: the direct path, then exponentially decaying noise (-60 dB at `rt60`)
    whose energy is `drr_db` below the direct path's."""
    rng = np.random.default_rng(seed)
    times = np.arange(1, int(rt60 * rate)) / rate
    tail = rng.standard_normal(times.size) * np.exp(-6.9078 * times / rt60)
    tail *= np.sqrt(10 ** (-drr_db / 10) / (np.sum(tail**2) + 1e-12))
    return np.concatenate([[1.0], tail]).astype(np.float32)


def augment(audio: np.ndarray, params: dict | None) -> np.ndarray:
    """Tempo and pitch, then the room, then noise and gain (`synthesize.augment` around the room)."""
    if not params:
        return audio
    audio = synthesize.augment(audio, {"tempo": params["tempo"], "pitch": params["pitch"]})
    room = params.get("room")
    if room:
        from scipy.signal import fftconvolve

        peak = float(np.abs(audio).max()) + 1e-9
        audio = fftconvolve(audio, room_response(room["rt60"], room["drr_db"], room["seed"]))[: audio.size]
        audio = (audio * peak / (float(np.abs(audio).max()) + 1e-9)).astype(np.float32)
    return synthesize.augment(audio, {"snr_db": params["snr_db"], "gain_db": params["gain_db"],
                                      "noise_seed": params["noise_seed"]})


# -------------------------------------------------------------------------------------------------------- planning
def _audio_name(kind: str, voice: str, text: str) -> str:
    return os.path.join("listening", kind, voice, hashlib.sha1(text.encode()).hexdigest()[:16] + ".wav")


def unheard_probe_words() -> set[str]:
    """The rarest word (plural-folded, `training.data.open_questions.words`) of each hearing probe of the open
    evaluation set: no training clip may say it, so each probe stays a name the model never heard."""
    import wordfreq

    from .open_questions import load_open_questions, words

    return {min(words(record["probe"]), key=lambda word: wordfreq.zipf_frequency(word, "en"))
            for record in load_open_questions() if record.get("probe")}


def plan_corpus(by_source: dict[str, list[str]], held_out: int = 300, voices=LISTENING_VOICES,
                reserved=RESERVED_VOICES, unheard: set[str] = frozenset(), seed: int = 0) -> tuple[list[dict], list[dict]]:
    """
    (training jobs, held-out jobs). `held_out` sentences of `HELD_OUT_SOURCES` (seeded) are taken out of training and
    spoken, clean, by each `reserved` voice; every other sentence without an `unheard` word (plural-folded) gets one
    training voice (seeded by the sentence) and augmentation. Training jobs come in a seeded order, so any prefix is
    a sample of every source and voice; dropping `unheard` words keeps the order of the others.
    """
    check_training_voices(voices)
    if set(voices) & set(reserved):
        raise ValueError(f"Voices {sorted(set(voices) & set(reserved))} are both training and reserved voices.")
    rng = random.Random(f"listening-{seed}")
    candidates = sorted({s for source in HELD_OUT_SOURCES for s in by_source.get(source, [])})
    chosen = set(rng.sample(candidates, min(held_out, len(candidates))))
    train, heldout = [], []
    for source in SOURCES:
        for text in by_source.get(source, []):
            if text in chosen:
                continue
            voice = synthesize._rng(seed, "listening", text).choice(list(voices))
            train.append({"id": f"listening-{hashlib.sha1(text.encode()).hexdigest()[:12]}-{voice}", "text": text,
                          "voice": voice, "source": source, "audio": _audio_name("train", voice, text),
                          "augment": draw_listening_augmentation(synthesize._rng(seed, "listening", text, voice))})
    rng.shuffle(train)
    if unheard:
        from .open_questions import words

        train = [job for job in train if not unheard & set(words(job["text"]))]
    for text in sorted(chosen):
        for voice in reserved:
            heldout.append({"id": f"heldout-{hashlib.sha1(text.encode()).hexdigest()[:12]}-{voice}", "text": text,
                            "voice": voice, "source": "heldout", "audio": _audio_name("heldout", voice, text),
                            "augment": None})
    return train, heldout


# -------------------------------------------------------------------------------------------------------- speaking
def _speak_chunk(task) -> dict:
    """Worker: speak one chunk's jobs (by voice), write its wav files and then its manifest; returns its summary."""
    out_dir, name, jobs = task
    manifest = os.path.join(out_dir, "listening", "chunks", f"{name}.jsonl")
    if os.path.isfile(manifest):
        return {"chunk": name, "skipped": True}
    engine_time: dict = {}
    by_voice: dict = {}
    for job in jobs:
        by_voice.setdefault(job["voice"], []).append(job)
    for voice, voice_jobs in by_voice.items():
        todo = [job for job in voice_jobs if not os.path.isfile(os.path.join(out_dir, job["audio"]))]
        start = time.perf_counter()
        if todo:
            audios = tts_voices.synthesize_texts(voice, [job["text"] for job in todo])
            for job, audio in zip(todo, audios):
                synthesize.write_wav(os.path.join(out_dir, job["audio"]), augment(audio, job["augment"]))
        engine = tts_voices.VOICES[voice][0]
        seconds, clips = engine_time.get(engine, (0.0, 0))
        engine_time[engine] = (seconds + time.perf_counter() - start, clips + len(todo))
    import soundfile as sf

    lines = [{**job, "duration": round(sf.info(os.path.join(out_dir, job["audio"])).duration, 3)} for job in jobs]
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    with open(manifest + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"engine_time": engine_time}) + "\n")
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    os.replace(manifest + ".tmp", manifest)
    return {"chunk": name, "skipped": False, "engine_time": engine_time}


def _read_chunk(out_dir: str, name: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(out_dir, "listening", "chunks", f"{name}.jsonl"), encoding="utf-8") as handle:
        header, *lines = [json.loads(line) for line in handle if line.strip()]
    return header, lines


def speak(jobs: list[dict], out_dir: str, prefix: str, workers: int = 2, verbose: bool = True) -> list[dict]:
    """Speak `jobs` in chunks named `<prefix>-<index>` (finished chunks are skipped); their manifest lines, in order."""
    needed = sorted({job["voice"] for job in jobs})
    missing = [voice for voice in needed if not tts_voices.voice_available(voice)]
    if missing:
        raise RuntimeError(f"TTS voices not available: {missing} (apt: flite festival espeak-ng ...; pip: piper-tts).")
    tasks = []
    for index in range(0, len(jobs), CHUNK_SIZE):
        chunk = jobs[index : index + CHUNK_SIZE]
        digest = hashlib.sha1("|".join(job["id"] for job in chunk).encode()).hexdigest()[:8]  # a new plan, new chunks
        tasks.append((out_dir, f"{prefix}-{index // CHUNK_SIZE:05d}-{digest}", chunk))
    start, done = time.perf_counter(), 0
    if workers <= 1:
        results = map(_speak_chunk, tasks)
        pool = None
    else:
        pool = get_context("spawn").Pool(workers, initializer=synthesize._init_worker, initargs=(1,))
        results = pool.imap(_speak_chunk, tasks)
    try:
        for result in results:
            done += 1
            if verbose and not result["skipped"]:
                print(f"[listening] {result['chunk']} ({done}/{len(tasks)}) after {time.perf_counter() - start:.0f} s",
                      flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return [line for _, name, _ in tasks for line in _read_chunk(out_dir, name)[1]]


def corpus_stats(out_dir: str, train: list[dict], heldout: list[dict]) -> dict:
    """Hours, clips, sentences, distinct words, voices, and each engine's clips per second of worker time."""
    engine_time: dict = {}
    for name in sorted(os.listdir(os.path.join(out_dir, "listening", "chunks"))):
        if name.endswith(".jsonl"):
            header, _ = _read_chunk(out_dir, name[: -len(".jsonl")])
            for engine, (seconds, clips) in header["engine_time"].items():
                total = engine_time.setdefault(engine, [0.0, 0])
                total[0] += seconds
                total[1] += clips
    words = {word for line in train for word in line["text"].split()}
    return {
        "train": {"clips": len(train), "hours": round(sum(line["duration"] for line in train) / 3600, 2),
                  "distinct_words": len(words), "voices": sorted({line["voice"] for line in train}),
                  "clips_per_source": {s: sum(line["source"] == s for line in train) for s in SOURCES}},
        "heldout": {"clips": len(heldout), "sentences": len({line["text"] for line in heldout}),
                    "hours": round(sum(line["duration"] for line in heldout) / 3600, 2),
                    "voices": sorted({line["voice"] for line in heldout}),
                    "words_unseen_in_train": len({w for line in heldout for w in line["text"].split()} - words)},
        "engine_clips_per_second": {engine: round(clips / seconds, 2) for engine, (seconds, clips) in
                                    sorted(engine_time.items()) if seconds > 0 and clips},
    }


def build_corpus(qa_path: str, out_dir: str, max_clips: int | None = None, held_out: int = 300,
                 vocabulary_size: int = 40000, repeats: int = 2, workers: int = 2, seed: int = 0) -> dict:
    """Plan, speak (resuming) and write the manifests and stats (see the module docstring); returns the stats."""
    excluded = held_out_words(read_jsonl(qa_path))
    by_source = listening_sentences(excluded, vocabulary_size, repeats, seed=seed)
    train, heldout = plan_corpus(by_source, held_out, unheard=unheard_probe_words(), seed=seed)
    train = train[:max_clips] if max_clips else train
    heldout_lines = speak(heldout, out_dir, "heldout", workers)
    train_lines = speak(train, out_dir, "train", workers)
    for name, lines, split in (("listening", train_lines, "train"), ("listening_heldout", heldout_lines, "test")):
        with open(os.path.join(out_dir, f"{name}.jsonl.tmp"), "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(json.dumps({**line, "split": split, "kind": "listening"}) + "\n")
        os.replace(os.path.join(out_dir, f"{name}.jsonl.tmp"), os.path.join(out_dir, f"{name}.jsonl"))
    stats = corpus_stats(out_dir, train_lines, heldout_lines)
    with open(os.path.join(out_dir, "listening_stats.json"), "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2)
    return stats


def stage_records(manifest: str) -> list[dict]:
    """`listening.jsonl` → stage-I manifest records (absolute audio paths, `LISTEN_PROMPT`, transcript = response)."""
    base = os.path.dirname(os.path.abspath(manifest))
    return [
        {"id": r["id"], "audio": os.path.join(base, r["audio"]), "transcript": r["text"], "prompt": LISTEN_PROMPT,
         "response": r["text"]}
        for r in read_jsonl(manifest)
    ]


def write_listening(qa: str, out: str, max_clips: int | None = None, held_out: int = 300, vocabulary_size: int = 40000,
                    repeats: int = 2, workers: int = min(2, os.cpu_count() or 1), seed: int = 0) -> dict:
    """`build_corpus` with the stats printed; returns the stats."""
    stats = build_corpus(qa, out, max_clips, held_out, vocabulary_size, repeats, workers, seed)
    print(json.dumps(stats, indent=2))
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", required=True, help="QA JSONL from training.data.spoken_qa (defines the held-out set)")
    parser.add_argument("--out", required=True, help="the speech directory of training.data.synthesize")
    parser.add_argument("--max-clips", type=int, default=None, help="speak only the first N training clips of the plan")
    parser.add_argument("--held-out", type=int, default=300, help="held-out sentences (each in every reserved voice)")
    parser.add_argument("--vocabulary-size", type=int, default=40000)
    parser.add_argument("--repeats", type=int, default=2, help="coverage lines per vocabulary word")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_listening(args.qa, args.out, args.max_clips, args.held_out, args.vocabulary_size, args.repeats, args.workers,
                    args.seed)


if __name__ == "__main__":
    main()
