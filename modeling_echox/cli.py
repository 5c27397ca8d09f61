"""The `echox` command line."""

import argparse
import sys
import time

import soundfile


def _init_random(args) -> None:
    from .random_checkpoint import write_random_checkpoint

    write_random_checkpoint(args.out, size=args.size, seed=args.seed)
    print(f"Wrote a random {args.size} EchoX checkpoint to {args.out}")


def _speak(args) -> None:
    import torch

    from .loading import load_echox

    model, processor = load_echox(args.model)
    started = time.perf_counter()
    inputs = processor(audio=args.input, text=args.prompt)
    with torch.inference_mode():
        output = model.generate(**inputs, tokenizer=processor.tokenizer, max_new_tokens=args.max_new_tokens)
    waveform = output.waveforms[0].numpy()
    soundfile.write(args.output, waveform, output.sampling_rate)
    print(output.text[0])
    print(
        f"[{len(waveform) / output.sampling_rate:.2f} s of speech in {len(output.segments[0])} segment(s), "
        f"{time.perf_counter() - started:.2f} s] -> {args.output}",
        file=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echox", description="EchoX speech-to-speech LLM")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init-random", help="write a randomly initialised checkpoint")
    init.add_argument("--size", default="tiny", choices=["tiny", "small"])
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init_random)

    speak = commands.add_parser("speak", help="answer a spoken question in text and speech")
    speak.add_argument("input", help="audio file with the question")
    speak.add_argument("-o", "--output", required=True, help="where to write the spoken answer (wav)")
    speak.add_argument("--model", required=True, help="EchoX checkpoint directory")
    speak.add_argument("--prompt", default="", help="text that goes with the audio in the user turn")
    speak.add_argument("--max-new-tokens", type=int, default=None)
    speak.set_defaults(run=_speak)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as error:
        print(f"echox: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
