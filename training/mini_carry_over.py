"""
Carry-over for EchoX-mini's recipe (`training.echox_mini --carry-over PARTS_DIR`): the steps in `CARRIABLE` take their
result from exported parts (`modeling_echox/mini/parts/`) instead of training again.
"""

import os

CARRIABLE = ("units", "vocoder", "stage1")


def carry_over_units(parts_dir: str, units_dir: str) -> None:
    """Put the parts' unit k-means where stage 0 finds it, so that stage 0 encodes with it instead of fitting one."""
    import shutil

    names = [name for name in os.listdir(parts_dir) if name.startswith("unit_kmeans")]
    if len(names) < 2:
        raise FileNotFoundError(f"{parts_dir} holds no unit k-means (unit_kmeans.json + .safetensors).")
    os.makedirs(units_dir, exist_ok=True)
    for name in names:
        if not os.path.exists(os.path.join(units_dir, name)):
            shutil.copy(os.path.join(parts_dir, name), units_dir)


def check_carried_unit_language(parts_dir: str, units_dir: str) -> None:
    """The unit language refitted by stage 0 must be the parts' one, token for token (else stage I's units differ)."""
    from modeling_echox.model.unit_vocabulary import EchoXUnitVocabulary
    from modeling_echox.units.unit_language import EchoXUnitLanguage

    refitted = EchoXUnitLanguage.from_pretrained(os.path.join(units_dir, "unit_language")).to_vocabulary().tokens
    carried = EchoXUnitVocabulary.from_file(os.path.join(parts_dir, "unit_vocab.txt")).tokens
    if refitted != carried:
        differ = sum(a != b for a, b in zip(refitted, carried)) + abs(len(refitted) - len(carried))
        raise SystemExit(f"The unit language refitted in {units_dir} differs from {parts_dir}'s in {differ} tokens: "
                         "the speech or stage 0's settings are not those the parts were trained on.")


def carry_over_vocoder(parts_dir: str, generator_dir: str) -> None:
    """The parts' vocoder saved as the vocoder step's generator."""
    from modeling_echox.mini.assembly import load_mini_parts

    model, _ = load_mini_parts(parts_dir)
    model.vocoder.save_pretrained(generator_dir)


def carry_over_stage1(parts_dir: str, base_dir: str, final_dir: str) -> None:
    """Stage I's result rebuilt from the parts: `base_dir` with the parts' adapter and LLM weights (echo decoder kept)."""
    from modeling_echox.mini.assembly import load_mini_parts
    from modeling_echox.model.loading import load_echox

    trained, _ = load_mini_parts(parts_dir)
    model, processor = load_echox(base_dir)
    stage1_prefixes = ("speech_adapter.", "language_model.")
    state = {name: tensor for name, tensor in trained.state_dict().items() if name.startswith(stage1_prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(name.startswith(stage1_prefixes) for name in missing):
        raise ValueError(f"{parts_dir} does not fit the base in {base_dir}: {unexpected[:3]} {missing[:3]}")
    model.save_pretrained(final_dir)
    processor.save_pretrained(final_dir)
