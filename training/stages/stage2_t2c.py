"""
Stage II — text-to-codec (T2C): the echo decoder learns to turn text into unit-language tokens. Its inputs are the
frozen LLM output-embedding rows of the gold text (the "text table", shared with the LLM as in the original), its
targets the unit-language indices of the spoken answer (whole response, or per segment when the manifest has
`segments`). Everything outside `echo_decoder` is frozen; the denoiser is frozen too (it is only used on LLM hidden
states, i.e. in stage III). No audio is read.

    python -m training.stages.stage2_t2c --config training/configs/stage2_tiny.json
"""


from .common import freeze_except, load_model, run_trainer, stage_cli
from .data import EchoXDataCollator, load_dialogue_dataset

DEFAULTS = {
    "trainable_modules": ["echo_decoder"],  # its denoiser stays frozen (`freeze_for_text_to_codec`)
    "training_args": {"learning_rate": 1e-3},  # the original run names suggest lr 1e-3
}


def freeze_for_text_to_codec(model, trainable_modules: list[str]) -> None:
    """Train only `trainable_modules`, never the echo decoder's denoiser (stage II feeds it no hidden states)."""
    freeze_except(model, trainable_modules)
    model.echo_decoder.denoiser.requires_grad_(False)


def main(config: dict) -> dict:
    model, processor = load_model(config)
    if config.get("lora"):
        raise ValueError("Stage II trains the echo decoder only; remove `lora` from its config.")
    dataset = load_dialogue_dataset(config["train_manifest"])
    collator = EchoXDataCollator(
        processor, model.config, stage="t2c", max_response_tokens=config["max_response_tokens"]
    )
    freeze_for_text_to_codec(model, config["trainable_modules"])
    model.train()
    return run_trainer(model, processor, config, dataset, collator, ["unit_labels"], "stage2_t2c")


def cli():
    stage_cli(__doc__.strip().splitlines()[0], DEFAULTS, main)


if __name__ == "__main__":
    cli()
