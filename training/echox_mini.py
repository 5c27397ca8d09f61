"""
The whole EchoX-mini training recipe in one command, every step resumable (a finished step is skipped, an interrupted
training resumes from its last checkpoint):

    python -m training.echox_mini [--work build] [--until STEP] [--export] [--carry-over PARTS_DIR [--carry STEPS]]
                                  [--skip STEPS]

On 2 cores stage II may train beside stage I, one thread each (two 2-thread trainings on 2 cores slow each other
down more than tenfold): `OMP_NUM_THREADS=1 python -m training.echox_mini --until stage2` and
`OMP_NUM_THREADS=1 python -m training.echox_mini --skip stage2 --until stage1_refine`, then the plain command.

Steps (outputs under `--work`):
    qa          data/qa.jsonl                     spoken-QA text, split by country (capitals, continents) and by
                                                   phrasing (days, months, arithmetic) (training.data.spoken_qa)
    speech      data/speech/{train,dev,test}.jsonl questions in 6 training voices (augmented; 2 per question, all 6
                                                   for days and months) / 2 held-out voices, answers in the answer
                                                   voice (training.data.synthesize)
    reading     data/speech/reading.jsonl          extra read speech in the answer voice (training.data.reading)
    fragments   data/speech/fragments.jsonl        answer pieces in the answer voice, for stage II (training.data.fragments)
    general     data/speech/general.jsonl          general English in the answer voice, for the vocoder and stage II
                                                   (training.data.general_reading)
    listening   data/speech/listening.jsonl        the listening corpus: tens of hours of read English (tens of
                                                   thousands of words) in every training voice, augmented; held-out
                                                   read sentences in the reserved voices (listening_heldout.jsonl)
                                                   (training.data.listening)
    hearing     runs/mini_hearing/final/           hearing first: the adapter's CTC dictation trained on the listening
                                                   corpus without the LLM's layers (training.stages.hearing,
                                                   mini_hearing.json); its adapter is where stage1_behaviour starts
    behaviour_prompts data/behaviour/prompts.jsonl  questions and requests over many topics, none sharing a content
                                                   word with the open set (training.data.behaviour_prompts; this and
                                                   the next two only with BEHAVIOUR_STAGE1)
    behaviour_answers data/behaviour/answers.jsonl  the text LLM's own greedy answer to each prompt (resumable)
    behaviour_speech  data/speech/behaviour.jsonl   the prompts spoken by the training voices (augmented)
    open_eval   data/open_eval/open_eval.jsonl     the open evaluation set (everyday questions, small talk, name and
                                                   held-out-country probes) in the reserved voices, checked against
                                                   the training texts above (training.data.open_questions)
    units       runs/mini_units/                   stage 0: Whisper tiny.en (10 s window) k-means, unit language
    vocoder     runs/mini_vocoder/generator/       the iSTFT unit vocoder (training/configs/mini_vocoder.json)
    base        runs/mini_base/                    EchoX-mini before training (modeling_echox.mini.assembly.build_mini_base)
    stage2      runs/mini_stage2/final/            text → unit language (echo decoder), every answer-voice clip, from
                                                   the base (it reads only the LLM's frozen text table, which stage I
                                                   leaves as it is, so `--until stage2` may run beside stage I); then
                                                   its read-back check on the dev answers (training.read_back_check)
    stage1      runs/mini_stage1/final/            speech → text (LoRA on q/k/v + adapter), on STAGE1_DATA
    stage1_refine runs/mini_stage1_refine/final/   a second stage-I pass from it: a fresh LoRA on every linear layer
                                                   of the LLM (mini_stage1_refine.json); the stage-I model of
                                                   stage III
    stage1_behaviour runs/mini_stage1_behaviour/final/ with BEHAVIOUR_STAGE1, instead of stage1 and stage1_refine:
                                                   from the hearing stage's adapter, the spoken prompts with the text
                                                   LLM's answers as targets + KL to the text LLM, taught facts a
                                                   minority (training.stages.stage1_behaviour); the stage-I model of
                                                   stage III
    stage3      runs/mini_stage3/final/            Echo training (the stage-I model's answers, labelled by the answer
                                                   voice's TTS or by the stage-II echo decoder, + read-aloud general
                                                   sentences: mini_stage3.json); with BEHAVIOUR_STAGE1 the questions
                                                   are the training questions and the spoken behaviour prompts
With `--export` the final model's trained parts are written to `modeling_echox/mini/parts/` (what is committed).
With `--carry-over PARTS_DIR` (e.g. `modeling_echox/mini/parts`) the steps named by `--carry` (default
`units,vocoder`; `stage1` may be added) take their result from those exported parts instead of training again:
`units` keeps the parts' k-means (stage 0 only encodes the speech and refits the deterministic unit language, which
must come out equal to the parts' one), `vocoder` keeps the parts' vocoder (only its resynthesis check runs), `stage1`
keeps the parts' adapter and LLM change (both stage-I passes: `stage1_refine`'s result is rebuilt from the parts).
The later steps train anew (stages II and III on a fresh echo decoder).
The stage configs are `training/configs/mini_*.json`; `--set stage1.training_args.max_steps=10` style overrides
are not offered here: edit the JSON (it is the record of what trained the committed parts).
"""

import argparse
import json
import os
import time

from .mini_carry_over import (
    CARRIABLE,
    carry_over_stage1,
    carry_over_units,
    carry_over_vocoder,
    check_carried_unit_language,
)
from .mini_manifests import (
    answer_all_prompts,
    behaviour_manifest,
    eval_manifest,
    held_out_units,
    read_aloud_manifest,
    stage_manifests,
    t2c_manifest,
)

STEPS = ("qa", "speech", "reading", "fragments", "general", "listening", "hearing", "behaviour_prompts",
         "behaviour_answers", "behaviour_speech", "open_eval", "units", "vocoder", "base", "stage2", "stage1",
         "stage1_refine", "stage1_behaviour", "stage3")
# The speech stage I trains on: the training questions. "listening" may be added (general sentences to repeat, which
# teach the adapter words no question holds, at a much higher step cost: MODEL_CARD.md).
STAGE1_DATA = ("train",)
# True: stage I is behaviour-aligned (stage1_behaviour, from the hearing stage's adapter in runs/mini_hearing) instead
# of stage1 and stage1_refine, and stage III builds on it (docs/experiments/behaviour-alignment.md). The committed
# parts were trained without it.
BEHAVIOUR_STAGE1 = False
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


def _call(function, **kwargs):
    """A step's action: `function(**kwargs)`, its result not logged."""

    def action():
        function(**kwargs)

    return action


def run(work: str = "build", until: str = "stage3", export: bool = False, carry_over: str | None = None,
        carry: tuple[str, ...] = ("units", "vocoder"), skip: tuple[str, ...] = ()) -> None:
    """
    Run the recipe's steps up to `until` (inclusive) in `work` (`carry_over`, `carry`: see the module docstring).
    The steps in `skip` are left to another process (e.g. stage II while this one trains stage I); a later step that
    needs one of them stops with an error until it has finished.
    """
    unknown = set(carry) - set(CARRIABLE)
    if unknown:
        raise ValueError(f"Only {CARRIABLE} can be carried over, not {sorted(unknown)}.")
    if set(skip) - set(STEPS):
        raise ValueError(f"Unknown steps to skip: {sorted(set(skip) - set(STEPS))}; the steps are {STEPS}.")
    carried = set(carry) if carry_over else set()
    from .data import (
        behaviour_prompts,
        fragments,
        general_reading,
        listening,
        open_questions,
        reading,
        spoken_qa,
        synthesize,
    )
    from .data.spoken_qa import read_jsonl

    last = STEPS.index(until)
    data, runs = os.path.join(work, "data"), os.path.join(work, "runs")
    speech = os.path.join(data, "speech")
    os.makedirs(runs, exist_ok=True)

    def step(name, output, action, inputs=()):
        if STEPS.index(name) > last or _done(output, inputs):
            return
        if name in skip:
            print(f"[echox-mini] {name} skipped (left to another process)", flush=True)
            return
        start = time.time()
        extra = action() or {}
        _log(work, name, time.time() - start, **extra)

    qa = os.path.join(data, "qa.jsonl")
    # The data steps: (step, its output, the function that makes it, keyword arguments).
    data_steps = [
        ("qa", qa, spoken_qa.write_qa, {"out": qa, "closed_split": "phrasing"}),
        ("speech", os.path.join(speech, "test.jsonl"), synthesize.synthesize_qa_speech,
         {"qa": qa, "out": speech, "voices_per_kind": {"day": 6, "month": 6}}),
        ("reading", os.path.join(speech, "reading.jsonl"), reading.write_reading, {"qa": qa, "out": speech}),
        ("fragments", os.path.join(speech, "fragments.jsonl"), fragments.write_fragments, {"qa": qa, "out": speech}),
        ("general", os.path.join(speech, "general.jsonl"), general_reading.write_general_reading,
         {"qa": qa, "out": speech}),
        ("listening", os.path.join(speech, "listening.jsonl"), listening.write_listening, {"qa": qa, "out": speech}),
    ]
    for name, output, function, kwargs in data_steps:
        step(name, output, _call(function, **kwargs))
    hearing_run = os.path.join(runs, "mini_hearing")

    def hearing_step():
        from .stages import hearing
        from .stages.common import load_config

        config = load_config(os.path.join(CONFIGS, "mini_hearing.json"), hearing.DEFAULTS, extra={
            "train_manifest": os.path.join(speech, "listening.jsonl"), "output_dir": hearing_run,
            "eval_manifest": os.path.join(speech, "listening_heldout.jsonl")})
        summary = hearing.main(config)
        return {"global_step": summary["global_step"], "dictation_wer": summary["dictation"]["wer_full"],
                "whisper_tiny_en_wer": summary["whisper_tiny_en"]["wer"]}

    # A grown corpus (a newer listening.jsonl) resumes the run from its last checkpoint on every clip.
    step("hearing", os.path.join(hearing_run, "final", "hearing.json"), hearing_step,
         inputs=[os.path.join(speech, "listening.jsonl"), os.path.join(CONFIGS, "mini_hearing.json")])
    behaviour = os.path.join(data, "behaviour")
    behaviour_prompts_path = os.path.join(behaviour, "prompts.jsonl")
    if BEHAVIOUR_STAGE1:
        step("behaviour_prompts", behaviour_prompts_path,
             lambda: behaviour_prompts.write_prompts(qa_path=qa, out_dir=behaviour), inputs=[qa])
        step("behaviour_answers", os.path.join(behaviour, "answers_done.json"),
             lambda: answer_all_prompts(behaviour_dir=behaviour), inputs=[behaviour_prompts_path])
        step("behaviour_speech", os.path.join(speech, "behaviour.jsonl"), lambda: {
            "manifest": behaviour_prompts.speak_prompts(read_jsonl(behaviour_prompts_path), speech)},
             inputs=[behaviour_prompts_path])
    # Read sentences may share words with the open set, never its facts (open_questions' rules): rebuilt on a change.
    read_texts = [os.path.join(speech, f"{name}.jsonl") for name in ("reading", "fragments", "general", "listening")]
    prompt_sets = [behaviour_prompts_path] if BEHAVIOUR_STAGE1 else []  # questions the model learns to answer
    open_eval = os.path.join(data, "open_eval")
    step("open_eval", os.path.join(open_eval, "open_eval.jsonl"), _call(
        open_questions.write_open_eval, out=open_eval, qa=qa,
        texts=[path for path in read_texts if os.path.exists(path)], prompts=prompt_sets),
         inputs=[qa, *read_texts, *prompt_sets])
    manifests = {}
    if _done(os.path.join(speech, "test.jsonl")):
        manifests = stage_manifests(speech, os.path.join(data, "stages"))
        eval_manifest(speech)
    if "listening" in STAGE1_DATA and _done(os.path.join(speech, "listening.jsonl")):
        from .stages.data import write_manifest

        manifests["listening"] = write_manifest(os.path.join(data, "stages", "s2t_listening.jsonl"),
                                                listening.stage_records(os.path.join(speech, "listening.jsonl")))

    units = os.path.join(runs, "mini_units")

    answer_manifests = [os.path.join(speech, name) for name in ("train.jsonl", "reading.jsonl", "fragments.jsonl")]
    vocoder_manifests = [os.path.join(speech, "general.jsonl")]

    def units_step():
        from .stages import stage0_units

        if "units" in carried:
            carry_over_units(carry_over, units)
        config = _config("stage0", work, output_dir=units, manifests=answer_manifests,
                         vocoder_manifests=vocoder_manifests)
        summary = stage0_units.main({**stage0_units.DEFAULTS, **config})
        if "units" in carried:
            check_carried_unit_language(carry_over, units)
        return summary

    # Stage 0 only adds what is new when a manifest changed (the k-means and unit language stay).
    step("units", os.path.join(units, "dialogues.jsonl"), units_step, inputs=answer_manifests + vocoder_manifests)

    vocoder = os.path.join(runs, "mini_vocoder")

    def vocoder_step():
        from . import resynthesis_check, train_vocoder

        held_out = held_out_units(units, speech, os.path.join(vocoder, "held_out.jsonl"),
                                  encoder_config=_config("stage0", work)["encoder"])
        if "vocoder" in carried:
            carry_over_vocoder(carry_over, os.path.join(vocoder, "generator"))
        else:
            config = train_vocoder.load_config(os.path.join(CONFIGS, "mini_vocoder.json"), {
                "train_manifest": os.path.join(units, "vocoder_units.jsonl"), "eval_manifest": held_out,
                "output_dir": vocoder})
            train_vocoder.train(config)
        result = resynthesis_check.write_resynthesis_check(vocoder=os.path.join(vocoder, "generator"),
                                                           manifest=held_out,
                                                           out=os.path.join(vocoder, "resynthesis.json"))
        return {"wer_resynthesis": result["wer_resynthesis"], "wer_original": result["wer_original"]}

    # New speech or a longer schedule resumes the vocoder from its last checkpoint.
    step("vocoder", os.path.join(vocoder, "resynthesis.json"), vocoder_step,
         inputs=[os.path.join(units, "vocoder_units.jsonl"), os.path.join(CONFIGS, "mini_vocoder.json")])

    base = os.path.join(runs, "mini_base")

    def base_step():
        from modeling_echox.mini.assembly import build_mini_base
        from modeling_echox.model.vocoder import EchoXCodeHifiGan
        from modeling_echox.units.unit_language import EchoXUnitLanguage

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
    stage2_final = os.path.join(stage2, "final")
    stage2_weights = os.path.join(stage2_final, "model.safetensors")  # stage II's output, which stage III waits for
    first_pass = os.path.join(stage1, "final")
    stage1_refine = os.path.join(runs, "mini_stage1_refine")
    stage1_behaviour_dir = os.path.join(runs, "mini_stage1_behaviour")
    # what stage III builds on
    stage1_model = os.path.join(stage1_behaviour_dir if BEHAVIOUR_STAGE1 else stage1_refine, "final")
    cache = os.path.join(runs, "encoder_cache")
    stage1_data = [manifests.get(name) for name in STAGE1_DATA]
    behaviour_stage1_manifest = os.path.join(data, "stages", "s2t_behaviour.jsonl")
    t2c = os.path.join(data, "stages", "t2c_train.jsonl")
    if _done(os.path.join(units, "vocoder_units.jsonl")):
        t2c_manifest(units, t2c)
    # Stage II reads only the LLM's frozen text table, which stage I leaves as it is, so it builds on the base and
    # needs no stage I: `--until stage2` can run it beside stage I.
    train_stage2 = stage_step("stage2", stage2_t2c, model=base, output_dir=stage2, train_manifest=t2c)

    def stage2_action():
        from . import read_back_check

        summary = train_stage2()
        # How well the new echo decoder reads text it never trained on: the dev split's answers (held-out countries).
        result = read_back_check.write_read_back_check(model=stage2_final, texts=os.path.join(speech, "dev.jsonl"),
                                                       out=os.path.join(stage2, "read_back.json"))
        return {**summary, "read_back_wer_dev": result["wer"]}

    step("stage2", stage2_weights, stage2_action)
    if "stage1" in carried:
        step("stage1_behaviour" if BEHAVIOUR_STAGE1 else "stage1_refine",
             os.path.join(stage1_model, "model.safetensors"), lambda: carry_over_stage1(carry_over, base, stage1_model))
    elif BEHAVIOUR_STAGE1:
        from .stages import stage1_behaviour

        hearing_adapter = os.path.join(runs, "mini_hearing", "final", "hearing_adapter.safetensors")
        train_behaviour = stage_step("stage1_behaviour", stage1_behaviour, model=base, output_dir=stage1_behaviour_dir,
                                     feature_cache_dir=cache, train_manifest=behaviour_stage1_manifest,
                                     taught_manifest=manifests.get("train"), init_adapter=hearing_adapter)

        def behaviour_action():
            if not os.path.isfile(hearing_adapter):
                raise SystemExit(f"stage1_behaviour starts from the hearing stage's adapter, and {hearing_adapter} "
                                 "does not exist yet (training.stages.hearing).")
            behaviour_manifest(qa=qa, behaviour_dir=behaviour, speech_dir=speech, out_path=behaviour_stage1_manifest)
            return train_behaviour()

        step("stage1_behaviour", os.path.join(stage1_model, "model.safetensors"), behaviour_action)
    else:
        step("stage1", os.path.join(first_pass, "model.safetensors"), stage_step(
            "stage1", stage1_s2t, model=base, output_dir=stage1, feature_cache_dir=cache, train_manifest=stage1_data))
        step("stage1_refine", os.path.join(stage1_model, "model.safetensors"), stage_step(
            "stage1_refine", stage1_s2t, model=first_pass, output_dir=stage1_refine, feature_cache_dir=cache,
            train_manifest=stage1_data), inputs=[os.path.join(first_pass, "model.safetensors")])
    # Paths of the stage-III options that mini_stage3.json switches on. TTS pseudo labels: stage 0's k-means and unit
    # language, and its units of the answer-voice speech already made, so that only new texts are spoken. Read-aloud
    # examples: the general sentences of stage II's manifest.
    stage3_paths = {}
    stage3_config = _config("stage3", work)
    if stage3_config.get("tts_labels"):
        stage3_paths["tts_labels"] = {"units_dir": units, "spoken_units": os.path.join(units, "vocoder_units.jsonl")}
    if stage3_config.get("read_aloud") and _done(t2c):
        read_aloud = read_aloud_manifest(t2c, speech, os.path.join(data, "stages", "read_aloud.jsonl"))
        stage3_paths["read_aloud"] = {"manifest": read_aloud}
    # With BEHAVIOUR_STAGE1 the echo decoder also learns to voice the answers to the behaviour prompts: trained on the
    # taught answers alone it does not voice the text LLM's free-form sentences (docs/experiments/open-evaluation.md).
    stage3_data = [manifests.get("train"), behaviour_stage1_manifest] if BEHAVIOUR_STAGE1 else manifests.get("train")
    train_stage3 = stage_step("stage3", stage3_echo, model=stage1_model, echo_decoder_from=stage2_final,
                              output_dir=stage3, train_manifest=stage3_data, feature_cache_dir=cache,
                              **stage3_paths)

    def stage3_action():
        if not _done(stage2_weights):  # e.g. still training under --skip stage2
            raise SystemExit(f"Stage III needs stage II's echo decoder, and {stage2_final} does not hold it yet.")
        return train_stage3()

    step("stage3", os.path.join(stage3, "final", "model.safetensors"), stage3_action)

    if export:
        from modeling_echox.mini.assembly import MINI_PARTS_DIR, export_mini_parts
        from modeling_echox.model.loading import load_echox

        final = os.path.join(runs, f"mini_{until}", "final") if until.startswith("stage") else None
        if final is None or not _done(final):
            raise SystemExit(f"--export needs a finished training stage; {until!r} has no final/ checkpoint.")
        model, processor = load_echox(final)
        # The vocoder trains on its own (step "vocoder"); take its latest generator, not the copy made at "base".
        from modeling_echox.model.vocoder import EchoXCodeHifiGan

        model.vocoder.load_state_dict(EchoXCodeHifiGan.from_pretrained(os.path.join(vocoder, "generator")).state_dict())
        sizes = export_mini_parts(model, processor, MINI_PARTS_DIR, unit_kmeans_dir=units,
                                  metadata={"trained_until": until, "recipe": "python -m training.echox_mini"})
        print(f"[echox-mini] exported {sizes} to {MINI_PARTS_DIR}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="build", help="working directory (data, runs, log)")
    parser.add_argument("--until", default="stage3", choices=STEPS, help="last step to run")
    parser.add_argument("--export", action="store_true", help="write the trained parts to modeling_echox/mini/parts/")
    parser.add_argument("--carry-over", metavar="PARTS_DIR",
                        help="take the results of the --carry steps from these exported parts instead of training them")
    parser.add_argument("--carry", default="units,vocoder",
                        help=f"comma-separated steps to carry over, of {','.join(CARRIABLE)} (default: units,vocoder)")
    parser.add_argument("--skip", default="", help="comma-separated steps left to another process (e.g. stage2, run "
                        "beside stage I as `--until stage2`)")
    args = parser.parse_args(argv)
    run(args.work, args.until, args.export, args.carry_over, tuple(filter(None, args.carry.split(","))),
        tuple(filter(None, args.skip.split(","))))


if __name__ == "__main__":
    main()
