"""The `echox` command line."""

import argparse
import json
import os
import sys
import time

import soundfile

MODEL_HELP = "EchoX checkpoint directory (default: $ECHOX_MODEL, else EchoX-mini, built once into the user cache)"
INT8_HELP = "quantize the LLM layers to int8 for CPU inference (faster, but lossy: MODEL_CARD.md gives its accuracy)"


def _init_random(args) -> None:
    from .testing.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(args.out, size=args.size, seed=args.seed)
    print(f"Wrote a random {args.size} EchoX checkpoint to {args.out}")


def _default_model(model: str | None) -> str:
    """`model`, else `$ECHOX_MODEL`, else EchoX-mini from the user cache (`default_model_dir`)."""
    from .mini.assembly import default_model_dir

    return default_model_dir(model)


def _build_mini(args) -> None:
    from .mini.assembly import build_mini, default_mini_dir, mini_is_built

    started = time.perf_counter()
    out = os.path.abspath(args.out or default_mini_dir())
    if not args.force and mini_is_built(out):
        print(f"EchoX-mini is already built from these parts in {out}")
        return
    build_mini(out)
    print(f"Built EchoX-mini in {out} ({time.perf_counter() - started:.1f} s)")


# The figures `echox eval` prints for each kind and each voice (one line each) and, with the all-words accuracies,
# overall.
EVAL_ROW_KEYS = ("n", "s2t_accuracy", "s2s_accuracy", "text_llm_accuracy", "speech_text_wer", "text_llm_right",
                 "s2t_retention", "s2s_retention", "probes", "s2t_hearing", "s2s_hearing", "text_llm_hearing",
                 "dictation_wer", "question_asr_wer")


def _eval(args) -> None:
    from .evaluation.spoken_qa import run_eval

    _prepare_output(args.out)  # before any model work: a bad --out would otherwise fail after the whole evaluation
    result = run_eval(
        _default_model(args.model), args.manifest, args.out, asr_model=args.asr_model, text_only=args.text_only,
        text_llm=None if args.text_llm == "none" else args.text_llm, segmentation_mode=args.mode,
        batch_size=args.batch_size, limit=args.limit, seed=args.seed, int8=args.int8,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
        generation={key: value for key, value in (("dictation_beam_size", args.dictation_beam_size),
                                                   ("dictation_lm_weight", args.dictation_lm_weight),
                                                   ("dictation_length_bonus", args.dictation_length_bonus))
                    if value is not None},
    )
    keys = ("n", "s2t_accuracy", "s2s_accuracy", "text_llm_accuracy", "s2t_accuracy_all_words",
            "s2s_accuracy_all_words", "text_llm_accuracy_all_words", *EVAL_ROW_KEYS[4:], "segmentation_mode", "seconds")
    summary = json.dumps({key: result[key] for key in keys if key in result}, indent=1)
    groups = [(name, result[name]) for name in ("by_kind", "by_voice") if name in result]
    for name, rows in groups:  # one line per kind / voice, the figures rounded
        lines = ",\n".join(
            f"  {json.dumps(group)}: "
            + json.dumps({key: round(row[key], 3) if isinstance(row[key], float) else row[key]
                          for key in EVAL_ROW_KEYS if row.get(key) is not None})
            for group, row in rows.items()
        )
        summary = f'{summary[:-2]},\n "{name}": {{\n{lines}\n }}\n}}'
    print(summary)
    print(f"-> {args.out}", file=sys.stderr)


def _non_negative_float(text: str) -> float:
    """argparse type: a number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _prepare_output(path: str) -> None:
    """Before any model work: refuse an output `path` that is a folder or cannot be written; create its folder."""
    if os.path.isdir(path):
        raise ValueError(f"The output path {path} is a folder; give a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        reason = "a file has that name" if isinstance(error, FileExistsError) else error.strerror or error
        raise OSError(f"Cannot create the output folder {folder}: {reason}.") from error
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OSError(f"Cannot write the output file {path}: permission denied.")


def _speak(args) -> None:
    import torch

    from .model.audio_io import load_audio
    from .model.loading import load_echox

    # A bad output name or question is refused before any model work (the output's missing folders are created).
    if not soundfile.check_format(os.path.splitext(args.output)[1][1:].upper(), "PCM_16" if args.stream else None):
        ends = ".wav, .flac or .aiff (--stream writes 16-bit PCM)" if args.stream else ".wav, .flac, .ogg or the like"
        raise ValueError(f"The output {args.output} is not an audio file name: it must end in {ends}.")
    load_audio(args.input, max_seconds=None)  # the processor checks the length against the model's limit
    _prepare_output(args.output)
    model, processor = load_echox(_default_model(args.model), int8=args.int8)
    started = time.perf_counter()
    inputs = processor(audio=args.input, text=args.prompt)
    generate_kwargs = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    with torch.inference_mode():
        if args.stream:
            _speak_streaming(model, processor, inputs, args, started, generate_kwargs)
            return
        output = model.generate(
            **inputs, processor=processor, segmentation_mode=args.mode, **generate_kwargs
        )
    waveform = output.waveforms[0].numpy()
    soundfile.write(args.output, waveform, output.sampling_rate)
    print(output.text[0])
    print(
        f"[{len(waveform) / output.sampling_rate:.2f} s of speech in {len(output.segments[0])} segment(s), "
        f"{time.perf_counter() - started:.2f} s] -> {args.output}",
        file=sys.stderr,
    )


def _speak_streaming(model, processor, inputs, args, started, generate_kwargs) -> None:
    """Write each spoken segment to the output file as soon as it is ready, and say when it came."""
    rate = model.config.vocoder_config.sampling_rate
    samples, text = 0, []
    with soundfile.SoundFile(args.output, "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
        for chunk in model.stream(
            **inputs, processor=processor, segmentation_mode=args.mode, **generate_kwargs
        ):
            out.write(chunk.audio)
            out.flush()
            samples += len(chunk.audio)
            text.append(chunk.text)
            elapsed = (time.perf_counter() - started) * 1000
            print(
                f"[{elapsed:7.0f} ms] segment {chunk.segment}: {len(chunk.audio) / rate:.2f} s of audio "
                f"(total {samples / rate:.2f} s) {chunk.text!r}",
                file=sys.stderr,
            )
    print("".join(text))


def _convert_original(args) -> None:
    from .convert.original import convert_original

    started = time.perf_counter()
    convert_original(
        args.echox,
        args.whisper,
        args.out,
        vocoder_checkpoint=args.vocoder_checkpoint,
        vocoder_config=args.vocoder_config,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
    )
    print(f"Wrote the converted EchoX checkpoint to {args.out} ({time.perf_counter() - started:.1f} s)")


def _import_finetune():
    """
    `training.finetune.finetune`, imported only when `echox finetune` runs: the training code lives beside the package
    in the repository (`training/`), not in it, so the checkout this package runs from is put on the path.
    """
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if importlib.util.find_spec("training") is None:
        if not os.path.isfile(os.path.join(root, "training", "finetune", "__init__.py")):
            raise OSError(
                "echox finetune needs the repository's training/ folder: run it from a clone installed with "
                "pip install -e '.[train]'."
            )
        sys.path.insert(0, root)
    try:
        from training.finetune import finetune
    except ModuleNotFoundError as error:
        raise OSError(
            f"echox finetune needs the train extra ({error.name} is missing): pip install -e '.[train]'."
        ) from None
    return finetune


def _finetune(args) -> None:
    from contextlib import nullcontext

    from accelerate import PartialState

    from .torch_threads import torch_threads

    finetune = _import_finetune()
    with torch_threads(args.threads) if args.threads else nullcontext():
        summary = finetune(
            _default_model(args.model), args.data, args.out, stage=args.stage, trainer=args.trainer,
            max_steps=args.max_steps, lora_r=args.lora_r, learning_rate=args.learning_rate,
            batch_size=args.batch_size, seed=args.seed, save_adapter=args.save_adapter, overrides=args.set,
        )
    if PartialState().is_main_process:
        losses = " -> ".join(f"{summary[key]:.3f}" for key in ("first_loss", "last_loss") if summary[key] is not None)
        print(f"Fine-tuned {summary['model']} on {summary['examples']} examples ({summary['trainer']}, stage "
              f"{summary['stage']}, {summary['global_step']} steps, {summary['seconds']:.0f} s), loss {losses}",
              file=sys.stderr)
        print(f"-> {summary['checkpoint']}", file=sys.stderr)


def _demo(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OSError("The demo needs gradio: pip install 'echox[demo]' (gradio==6.31.0).") from None
    from . import demo

    argv = ["--model", _default_model(args.model), "--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    demo.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echox", description="EchoX speech-to-speech LLM",
        epilog="A user error ends with one line 'echox: error: ...' and exit code 2 (ECHOX_DEBUG=1: its traceback).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init-random", help="write a randomly initialised checkpoint")
    init.add_argument("--size", default="tiny", choices=["tiny", "small"])
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init_random)

    speak = commands.add_parser("speak", help="answer a spoken question in text and speech")
    speak.add_argument("input", help="audio file with the question")
    speak.add_argument("-o", "--output", required=True,
                       help="where to write the spoken answer (.wav; missing folders are created)")
    speak.add_argument("--model", default=None, help=MODEL_HELP)
    speak.add_argument("--prompt", default="", help="text that goes with the audio in the user turn")
    speak.add_argument("--max-new-tokens", type=_positive_int, default=None)
    speak.add_argument("--stream", action="store_true", help="write the answer as it is spoken, segment by segment")
    speak.add_argument("--mode", choices=["faithful", "fast"], default=None, help="segmentation rule (default: config)")
    speak.add_argument("--int8", action="store_true", help=INT8_HELP)
    speak.set_defaults(run=_speak)

    convert = commands.add_parser(
        "convert-original", help="convert a released EchoX checkpoint (+ its Whisper-large-v3 encoder) to this format"
    )
    convert.add_argument("--echox", required=True, help="directory of the released EchoX files (config, shards, tokenizer)")
    convert.add_argument("--whisper", required=True, help="Whisper directory (config.json, preprocessor_config.json, safetensors)")
    convert.add_argument("--out", required=True, help="output checkpoint directory")
    convert.add_argument("--vocoder-checkpoint", default=None, help="fairseq vocoder checkpoint (default: ECHOX/g_00500000)")
    convert.add_argument("--vocoder-config", default=None, help="fairseq vocoder config (default: ECHOX/vocoder_config.json)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    convert.add_argument(
        "--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="cast the weights (default: as stored)"
    )
    convert.set_defaults(run=_convert_original)
    mini = commands.add_parser("build-mini", help="assemble EchoX-mini from the installed base weights + shipped parts")
    mini.add_argument("--out", default=None,
                      help="output directory (default: the user cache, keyed by the parts' hash; see README)")
    mini.add_argument("--force", action="store_true", help="rebuild even if OUT already holds these parts' build")
    mini.set_defaults(run=_build_mini)

    evaluate = commands.add_parser("eval", help="spoken-QA accuracy in text and speech (+ ASR WER of the speech)")
    evaluate.add_argument("--model", default=None, help=MODEL_HELP)
    evaluate.add_argument("--manifest", required=True,
                          help='JSONL: {"id", "audio", "answers": [...], "question"?, "kind"?, "voice"?, "probe"?}')
    evaluate.add_argument("--out", required=True,
                          help="result JSON (summary + per-item records; missing folders are created)")
    evaluate.add_argument("--asr-model", default=None, help="CTranslate2 Whisper dir for the spoken answers (default: tiny.en)")
    evaluate.add_argument("--mode", choices=["faithful", "fast"], default=None, help="segmentation rule (default: config)")
    evaluate.add_argument("--int8", action="store_true", help=INT8_HELP)
    evaluate.add_argument("--text-llm", choices=["auto", "smollm2", "model", "none"], default="auto",
                          help="text-LLM baseline on the `question` field (default auto: SmolLM2 for EchoX-mini)")
    evaluate.add_argument("--text-only", action="store_true", help="no speech output (s2t only)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8)
    evaluate.add_argument("--limit", type=_positive_int, default=None,
                          help="evaluate a seeded random subset of N questions")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--dictation-beam-size", type=_positive_int, default=None,
                          help="adapter_output='dictation' only: CTC prefix beam width of the dictation (default: "
                               "the generation config's; 1 = greedy)")
    evaluate.add_argument("--dictation-lm-weight", type=_non_negative_float, default=None,
                          help="adapter_output='dictation' only: weight of the LLM's own score of the dictated words "
                               "in that search (default: the generation config's)")
    evaluate.add_argument("--dictation-length-bonus", type=float, default=None,
                          help="adapter_output='dictation' only: score added per dictated token in that search "
                               "(default: the generation config's)")
    evaluate.set_defaults(run=_eval)

    tune = commands.add_parser(
        "finetune", help="fine-tune EchoX on your own spoken questions and answers (LoRA, TRL or Trainer)",
        description="Fine-tune an EchoX checkpoint on your own speech (training/finetune/); needs a clone of the "
                    "repository installed with its train extra. Re-running the same command resumes it.",
    )
    tune.add_argument("--model", default=None, help=MODEL_HELP)
    tune.add_argument("--data", required=True,
                      help='JSONL of {"audio": path, "transcript": text, "answer": text} (paths relative to the file), '
                           "or a datasets folder (save_to_disk) with audio, question/transcript and answer columns")
    tune.add_argument("--out", required=True, help="folder of the fine-tuned checkpoint (the run in OUT/training)")
    tune.add_argument("--trainer", default="trl", help="trl (TRL's SFTTrainer, default) or trainer (Trainer)")
    tune.add_argument("--stage", default="1", help="1: speech to text (default); 3: echo training of the spoken answer")
    tune.add_argument("--max-steps", type=_positive_int, default=100)
    tune.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16 at stage 1, none at stage 3; 0: none)")
    tune.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default 3e-4, cosine)")
    tune.add_argument("--batch-size", type=_positive_int, default=4, help="clips per step and process (default 4)")
    tune.add_argument("--seed", type=int, default=1234)
    tune.add_argument("--save-adapter", action="store_true",
                      help="keep the LoRA as a peft adapter on the base model instead of merging it")
    tune.add_argument("--threads", type=_positive_int, default=None,
                      help="torch threads of the run (default: torch's; 1 where the cores are busy with other work)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any stage-config field (training/stages/README.md), e.g. training_args.logging_steps=1")
    tune.set_defaults(run=_finetune)

    demo = commands.add_parser("demo", help="run the Gradio speech-to-speech demo (modeling_echox/demo.py)")
    demo.add_argument(
        "--model",
        default=None,
        help=MODEL_HELP,
    )
    demo.add_argument("--port", type=int, default=None, help="server port (default: 7860)")
    demo.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1; 0.0.0.0 to share)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    """
    Run one `echox` command. A user error (a missing or damaged file, bad audio, a bad checkpoint or option: `OSError`
    / `ValueError`) ends with one line `echox: error: ...` on stderr and exit code 2, or with its traceback when
    `ECHOX_DEBUG=1`; any other exception is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as error:
        if os.environ.get("ECHOX_DEBUG", "") not in ("", "0"):
            raise
        print(f"echox: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echox: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
