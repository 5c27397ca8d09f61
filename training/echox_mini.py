"""
The whole EchoX-mini training recipe in one command, every step resumable (a finished step is skipped, an interrupted
training resumes from its last checkpoint):

    python -m training.echox_mini [--work build] [--until STEP] [--export]

Steps (outputs under `--work`):
    qa          data/qa.jsonl                     spoken-QA text, split by country (training.data.spoken_qa)
    speech      data/speech/{train,dev,test}.jsonl questions in 6 training voices (augmented) / 2 held-out voices,
                                                   answers in the answer voice (training.data.synthesize)
    reading     data/speech/reading.jsonl          extra read speech in the answer voice (training.data.reading)
    fragments   data/speech/fragments.jsonl        answer pieces in the answer voice, for stage II (training.data.fragments)
    general     data/speech/general.jsonl          general English in the answer voice, for the vocoder only
                                                   (training.data.general_reading)
    units       runs/mini_units/                   stage 0: Whisper tiny.en (10 s window) k-means, unit language
    vocoder     runs/mini_vocoder/generator/       the iSTFT unit vocoder (training/configs/mini_vocoder.json)
    base        runs/mini_base/                    EchoX-mini before training (echox_mini.build_mini_base)
    stage1      runs/mini_stage1/final/            speech → text (LoRA + adapter)
    stage2      runs/mini_stage2/final/            text → unit language (echo decoder)
    stage3      runs/mini_stage3/final/            Echo training (pseudo labels from stages I and II)
With `--export` the final model's trained parts are written to `modeling_echox/mini_parts/` (what is committed).
The stage configs are `training/configs/mini_*.json`; `--set stage1.training_args.max_steps=10` style overrides
are not offered here: edit the JSON (it is the record of what trained the committed parts).
"""

import argparse
import json
import os
import random
import time

STEPS = ("qa", "speech", "reading", "fragments", "general", "units", "vocoder", "base", "stage1", "stage2", "stage3")
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _done(path: str, inputs=()) -> bool:
    """`path` exists and is newer than every existing file in `inputs` (a data step added or redone since is new)."""
    if not os.path.exists(path):
        return False
    return all(os.path.getmtime(source) <= os.path.getmtime(path) for source in inputs if os.path.exists(source))


def _config(name: str, work: str, **paths) -> dict:
    with open(os.path.join(CONFIGS, f"mini_{name}.json"), encoding="utf-8") as handle:
        config = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    for key, value in paths.items():
        config[key] = value
    return config


def _log(work: str, step: str, seconds: float, **extra) -> None:
    with open(os.path.join(work, "mini_recipe_log.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "seconds": round(seconds, 1), **extra}) + "\n")
    print(f"[echox-mini] {step} done in {seconds:.0f} s {extra or ''}", flush=True)


def stage_manifests(speech_dir: str, out_dir: str) -> dict[str, str]:
    """The synthesized manifests → stage-I manifests (`audio`, `transcript`, `response`), absolute paths."""
    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split in ("train", "dev", "test"):
        source = os.path.join(speech_dir, f"{split}.jsonl")
        if not os.path.isfile(source):
            continue
        records = [
            {"id": r["id"], "audio": os.path.join(os.path.abspath(speech_dir), r["audio"]), "transcript": r["question"],
             "response": r["answer_text"], "answer_audio": os.path.join(os.path.abspath(speech_dir), r["answer_audio"]),
             "answer_text": r["answer_text"]}
            for r in read_jsonl(source)
        ]
        paths[split] = write_manifest(os.path.join(out_dir, f"s2t_{split}.jsonl"), records)
    return paths


def t2c_manifest(units_dir: str, out_path: str) -> str:
    """Stage II's manifest: each distinct spoken answer once, `{"id", "response", "units"}` (from stage 0)."""
    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest

    unique = {}
    for record in read_jsonl(os.path.join(units_dir, "dialogues.jsonl")):
        unique.setdefault(record["answer_audio"], {
            "id": f"t2c-{len(unique)}", "response": record.get("response") or record["answer_text"], "units": record["units"]})
    return write_manifest(out_path, list(unique.values()))


def eval_manifest(speech_dir: str, split: str = "test", seed: int = 0) -> str:
    """
    `<speech_dir>/eval_<split>.jsonl` for `echox eval`: every held-out voice, one seeded phrasing per capital,
    continent and arithmetic item, every phrasing of the (few) day and month items.
    """
    from .data.spoken_qa import read_jsonl

    rng = random.Random(f"eval-{seed}")
    records = read_jsonl(os.path.join(speech_dir, f"{split}.jsonl"))
    phrasings: dict = {}
    for record in records:
        phrasings.setdefault(record["item"], set()).add(record["id"].rsplit("-", 1)[0])
    chosen = {item: rng.choice(sorted(ids)) for item, ids in sorted(phrasings.items())}
    path = os.path.join(speech_dir, f"eval_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            question_id = record["id"].rsplit("-", 1)[0]
            if record["kind"] in ("day", "month") or chosen[record["item"]] == question_id:
                line = {key: record[key] for key in ("id", "audio", "answers", "question", "kind", "voice")}
                handle.write(json.dumps(line) + "\n")
    return path


def held_out_units(units_dir: str, speech_dir: str, out_path: str, limit: int = 30) -> str:
    """Units of held-out answers (test split, never trained on) in the vocoder manifest format, for the WER check."""
    from modeling_echox.audio_io import load_audio
    from modeling_echox.units import EchoXUnitExtractor

    from .data.spoken_qa import read_jsonl
    from .stages.data import write_manifest
    from .stages.stage0_units import load_encoder

    encoder, feature_extractor = load_encoder(_config("stage0", "")["encoder"])
    extractor = EchoXUnitExtractor.from_pretrained(units_dir, encoder, feature_extractor=feature_extractor)
    answers = sorted({(r["answer_audio"], r["answer_text"]) for r in read_jsonl(os.path.join(speech_dir, "test.jsonl"))})
    items = []
    for audio, text in answers[:limit]:
        path = os.path.join(os.path.abspath(speech_dir), audio)
        units, durations = extractor(load_audio(path))
        items.append({"audio": path, "text": text, "units": units.tolist(), "durations": durations.tolist()})
    return write_manifest(out_path, items)


def run(work: str = "build", until: str = "stage3", export: bool = False) -> None:
    """Run the recipe's steps up to `until` (inclusive) in `work`."""
    from .data import fragments, general_reading, reading, spoken_qa, synthesize

    last = STEPS.index(until)
    data, runs = os.path.join(work, "data"), os.path.join(work, "runs")
    speech = os.path.join(data, "speech")
    os.makedirs(runs, exist_ok=True)

    def step(name, output, action, inputs=()):
        if STEPS.index(name) > last or _done(output, inputs):
            return
        start = time.time()
        extra = action() or {}
        _log(work, name, time.time() - start, **extra)

    qa = os.path.join(data, "qa.jsonl")
    step("qa", qa, lambda: spoken_qa.main(["--out", qa]))
    step("speech", os.path.join(speech, "test.jsonl"), lambda: synthesize.main(["--qa", qa, "--out", speech]))
    step("reading", os.path.join(speech, "reading.jsonl"), lambda: reading.main(["--qa", qa, "--out", speech]))
    step("fragments", os.path.join(speech, "fragments.jsonl"), lambda: fragments.main(["--qa", qa, "--out", speech]))
    step("general", os.path.join(speech, "general.jsonl"), lambda: general_reading.main(["--qa", qa, "--out", speech]))
    manifests = {}
    if _done(os.path.join(speech, "test.jsonl")):
        manifests = stage_manifests(speech, os.path.join(data, "stages"))
        eval_manifest(speech)

    units = os.path.join(runs, "mini_units")

    answer_manifests = [os.path.join(speech, name) for name in ("train.jsonl", "reading.jsonl", "fragments.jsonl")]
    vocoder_manifests = [os.path.join(speech, "general.jsonl")]

    def units_step():
        from .stages import stage0_units

        config = _config("stage0", work, output_dir=units, manifests=answer_manifests,
                         vocoder_manifests=vocoder_manifests)
        return stage0_units.main({**stage0_units.DEFAULTS, **config})

    # Stage 0 only adds what is new when a manifest changed (the k-means and unit language stay).
    step("units", os.path.join(units, "dialogues.jsonl"), units_step, inputs=answer_manifests + vocoder_manifests)

    vocoder = os.path.join(runs, "mini_vocoder")

    def vocoder_step():
        from . import resynthesis_check, train_vocoder

        held_out = held_out_units(units, speech, os.path.join(vocoder, "held_out.jsonl"))
        config = train_vocoder.load_config(os.path.join(CONFIGS, "mini_vocoder.json"), {
            "train_manifest": os.path.join(units, "vocoder_units.jsonl"), "eval_manifest": held_out,
            "output_dir": vocoder})
        train_vocoder.train(config)
        result = resynthesis_check.main(["--vocoder", os.path.join(vocoder, "generator"), "--manifest", held_out,
                                         "--out", os.path.join(vocoder, "resynthesis.json")])
        return {"wer_resynthesis": result["wer_resynthesis"], "wer_original": result["wer_original"]}

    # New speech or a longer schedule resumes the vocoder from its last checkpoint.
    step("vocoder", os.path.join(vocoder, "resynthesis.json"), vocoder_step,
         inputs=[os.path.join(units, "vocoder_units.jsonl"), os.path.join(CONFIGS, "mini_vocoder.json")])

    base = os.path.join(runs, "mini_base")

    def base_step():
        from modeling_echox.echox_mini import build_mini_base
        from modeling_echox.unit_language import EchoXUnitLanguage
        from modeling_echox.vocoder import EchoXCodeHifiGan

        language = EchoXUnitLanguage.from_pretrained(os.path.join(units, "unit_language"))
        vocoder_model = EchoXCodeHifiGan.from_pretrained(os.path.join(vocoder, "generator"))
        vocoder_config = {k: v for k, v in vocoder_model.config.to_dict().items()
                          if k not in ("model_type", "transformers_version", "architectures", "dtype")}
        model, processor = build_mini_base(language.to_vocabulary(), language.num_units, vocoder=vocoder_config)
        model.vocoder.load_state_dict(vocoder_model.state_dict())
        model.save_pretrained(base)
        processor.save_pretrained(base)

    step("base", os.path.join(base, "model.safetensors"), base_step)

    def stage_step(name, module, **paths):
        def action():
            from .stages.common import load_config

            config = load_config(os.path.join(CONFIGS, f"mini_{name}.json"), module.DEFAULTS, extra=paths)
            summary = module.main(config)
            return {"global_step": summary.get("global_step"), "train_loss": summary.get("train_loss")}

        return action

    from .stages import stage1_s2t, stage2_t2c, stage3_echo

    stage1, stage2, stage3 = (os.path.join(runs, f"mini_stage{i}") for i in (1, 2, 3))
    cache = os.path.join(runs, "encoder_cache")
    step("stage1", os.path.join(stage1, "final", "model.safetensors"), stage_step(
        "stage1", stage1_s2t, model=base, train_manifest=manifests.get("train"), output_dir=stage1,
        feature_cache_dir=cache))
    t2c = os.path.join(data, "stages", "t2c_train.jsonl")
    if _done(os.path.join(units, "dialogues.jsonl")):
        t2c_manifest(units, t2c)
    step("stage2", os.path.join(stage2, "final", "model.safetensors"), stage_step(
        "stage2", stage2_t2c, model=os.path.join(stage1, "final"), output_dir=stage2, train_manifest=t2c))
    step("stage3", os.path.join(stage3, "final", "model.safetensors"), stage_step(
        "stage3", stage3_echo, model=os.path.join(stage1, "final"), echo_decoder_from=os.path.join(stage2, "final"),
        output_dir=stage3, train_manifest=manifests.get("train"), feature_cache_dir=cache))

    if export:
        from modeling_echox.echox_mini import MINI_PARTS_DIR, export_mini_parts
        from modeling_echox.loading import load_echox

        final = os.path.join(runs, f"mini_{until}", "final") if until.startswith("stage") else None
        if final is None or not _done(final):
            raise SystemExit(f"--export needs a finished training stage; {until!r} has no final/ checkpoint.")
        model, processor = load_echox(final)
        # The vocoder trains on its own (step "vocoder"); take its latest generator, not the copy made at "base".
        from modeling_echox.vocoder import EchoXCodeHifiGan

        model.vocoder.load_state_dict(EchoXCodeHifiGan.from_pretrained(os.path.join(vocoder, "generator")).state_dict())
        sizes = export_mini_parts(model, processor, MINI_PARTS_DIR, unit_kmeans_dir=units,
                                  metadata={"trained_until": until, "recipe": "python -m training.echox_mini"})
        print(f"[echox-mini] exported {sizes} to {MINI_PARTS_DIR}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="build", help="working directory (data, runs, log)")
    parser.add_argument("--until", default="stage3", choices=STEPS, help="last step to run")
    parser.add_argument("--export", action="store_true", help="write the trained parts to modeling_echox/mini_parts/")
    args = parser.parse_args(argv)
    run(args.work, args.until, args.export)


if __name__ == "__main__":
    main()
