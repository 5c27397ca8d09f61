"""
EchoX-mini with another hearing: the committed model (its echo decoder, vocoder and unit tables) with a hearing stage's
adapter (`training.stages.hearing`) in place of its own, the LLM as committed or as the base (SmolLM2 as released,
without the stage-I LoRA change), and a chosen speech interface (`EchoXConfig.adapter_output`). These are the models
that measure what hearing alone changes, before any stage trains on it (docs/experiments/open-evaluation.md):

    python -m training.hearing_swap --adapter build/runs/mini_hearing/final/hearing_adapter.safetensors \
        --llm base --adapter-output dictation --out build/runs/mini_dictation_base
"""

import argparse

from modeling_echox.model.configuration_echox import ADAPTER_OUTPUTS

LLM_CHOICES = ("committed", "base")


def swap_hearing(adapter_path: str, out_dir: str, llm: str = "committed", adapter_output: str = "dictation",
                 mini_dir: str | None = None) -> str:
    """Write EchoX-mini (`mini_dir`, default: the committed parts built by `ensure_mini`) with the hearing adapter at
    `adapter_path`, the `llm` weights and the `adapter_output` interface to `out_dir` (a loadable checkpoint);
    returns `out_dir`."""
    from modeling_echox.mini.assembly import build_mini_base, ensure_mini
    from modeling_echox.model.loading import load_echox

    from .stages.hearing import load_hearing_adapter
    from .stages.stage1_behaviour import set_adapter_output

    if llm not in LLM_CHOICES:
        raise ValueError(f"llm must be one of {LLM_CHOICES}, got {llm!r}.")
    model, processor = load_echox(mini_dir or ensure_mini())
    load_hearing_adapter(model, adapter_path)
    if llm == "base":
        base, _ = build_mini_base(processor.unit_vocabulary, model.config.num_units, config=model.config,
                                  generation_config=model.generation_config)
        model.language_model.load_state_dict(base.language_model.state_dict())
    set_adapter_output(model, adapter_output)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--adapter", required=True, help="a hearing_adapter.safetensors of training.stages.hearing")
    parser.add_argument("--llm", choices=LLM_CHOICES, default="committed",
                        help="the LLM as committed (with its stage-I change) or as the base")
    parser.add_argument("--adapter-output", choices=ADAPTER_OUTPUTS, default="dictation")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(swap_hearing(args.adapter, args.out, args.llm, args.adapter_output))


if __name__ == "__main__":
    main()
