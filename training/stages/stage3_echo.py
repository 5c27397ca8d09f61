"""
Stage III — Echo training. The targets are made by the models themselves, as in the paper:

1. the stage-I model answers every spoken question greedily (`model.generate(return_audio=False)`): its own text;
2. the frozen stage-II (text-to-codec) echo decoder turns that text — the text-table embeddings of the generated ids,
   without the denoiser — into unit-language tokens (`text_to_unit_language`): the pseudo labels. With `tts_labels`
   the text is spoken by a TTS voice and its stage-0 units are the labels instead (`SpokenUnitLabeler`).

Both are precomputed once into a JSONL cache (`targets_cache`, manifest format with `response_ids`, `units`,
`segments` and `segment_lengths`), appended one record at a time so that a killed precompute resumes where it stopped.
Then the model trains on its hidden states: denoiser → echo decoder against the pseudo labels (echo CE + the denoising
cosine loss capped at 20 % of it, both in `forward`). With `segment_wise` the answer is cut into segments with the
same rule streaming inference uses (`segmentation_rule(generation_config, segmentation_mode)` on the cosine to ".")
and each segment is one echo-decoder sample (`echo_segment_lengths`; echo loss only, as released); otherwise the
whole answer is one segment and the S2T loss (CE + 0.3 · CTC) joins by the paper's rule. Trainable: LoRA on the LLM +
speech_adapter + echo_decoder (denoiser included).

    python -m training.stages.stage3_echo --config training/configs/stage3_tiny.json [--set trainer=trl]

Only the precompute path is implemented (on-the-fly target generation is not).
"""

import json
import os
import random

import torch
from accelerate import PartialState
from torch import nn

from modeling_echox.model.generation_configuration_echox import EchoXGenerationConfig
from modeling_echox.model.segmentation import boundary_scores, segmentation_rule

from .common import load_model, prepare_trainable, run_trainer, stage_cli
from .run_log import log_event
from .data import (
    EchoXDataCollator,
    extract_features,
    load_dialogue_dataset,
    read_manifest,
)
from .stage1_s2t import build_feature_cache

DEFAULTS = {
    "trainer": "trainer",  # "trainer" (transformers.Trainer) | "trl" (TRL's SFTTrainer, training/stages/trl_trainer.py)
    "echo_decoder_from": None,  # stage-II final/ directory: its echo decoder initialises (and labels for) stage III
    "targets_cache": None,  # default <output_dir>/echo_targets.jsonl
    "segment_wise": True,  # the released segment-wise mode (matches streaming inference)
    # "faithful" | "fast" | None (the config's default), or a list of them: each answer is then cut by every rule and
    # each cut is its own training example (id suffixed "#mode"), so the echo decoder learns both modes' segments
    "segmentation_mode": None,
    "generation": {},  # kwargs of model.generate for the pseudo-label answers (default: greedy, the model's config)
    "max_examples": None,  # pseudo-label only this many training records (a seeded random subset), e.g. on a CPU
    "label_batch_size": 8,  # questions answered together while pseudo-labelling
    # {"voice", "units_dir", "encoder"?}: label each segment with the units of its text spoken by this TTS voice
    # (training.stages.tts_labels) instead of the stage-II echo decoder's output (the paper's labels)
    "tts_labels": None,
    # {"manifest", "limit"?, "prompt"?}: add read-aloud examples: the items of a stage-II manifest (`{"response",
    # "units"}`, unit-language indices of that text spoken in the answer voice) become text-only prompts ("Say: <text>"
    # by default) answered, teacher-forced, by that text and labelled with its units; they widen the words the echo
    # decoder learns to voice
    "read_aloud": None,
    "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "trainable_modules": ["speech_adapter", "echo_decoder"],
    "training_args": {"learning_rate": 3e-5},  # the original run names suggest lr 3e-5
}


# -------------------------------------------------------------------------------------------------- pseudo labels
@torch.no_grad()
def text_to_unit_language(
    model, id_lists: list[list[int]], max_new_tokens: int | None = None, first_segment: list[bool] | None = None
) -> list[list[int]]:
    """
    The frozen text-to-codec path: LLM text ids of each segment → unit-language indices (0-based), by greedy echo
    decoding of the segment's text-table embeddings (no denoiser), exactly as stage II trained the echo decoder
    (`first_segment[i]`: segment i opens a response, so its prefix has no quirk id; default: the first of the list).
    """
    table = model.text_table
    token_ids = [torch.tensor(ids, dtype=torch.long, device=table.device) for ids in id_lists]
    segments = [nn.functional.embedding(ids, table) for ids in token_ids]
    first_segment = [i == 0 for i in range(len(id_lists))] if first_segment is None else first_segment
    quirks = [not first for first in first_segment]
    if max_new_tokens is None:
        max_new_tokens = EchoXGenerationConfig.from_generation_config(model.generation_config).echo_max_new_tokens
    echo_ids = model.echo_decoder.generate(
        segments, table, max_new_tokens=max_new_tokens, denoise=False, quirk_flags=quirks, token_ids=token_ids
    )
    offset, size = model.config.unit_token_offset, model.config.unit_vocab_size
    return [[i - offset for i in ids if offset <= i < offset + size] for ids in echo_ids]


@torch.no_grad()
def answer_states(model, prompt_ids: list[int], answer: list[int], input_features) -> torch.Tensor:
    """Teacher-forced final-layer states that produce each answer token `[len(answer), H]` (as `generate` keeps them)."""
    input_ids = torch.tensor([prompt_ids + answer], dtype=torch.long)
    labels = torch.tensor([[-100] * len(prompt_ids) + answer], dtype=torch.long)
    prompt = model._prepare_prompt(input_ids, None, input_features, labels)
    outputs = model.language_model(
        inputs_embeds=prompt.inputs_embeds,
        attention_mask=prompt.attention_mask,
        position_ids=prompt.position_ids,
        output_hidden_states=True,
    )
    producing = prompt.labels[0, 1:] != -100
    return outputs.hidden_states[-1][0, :-1][producing]


def _done_ids(path: str) -> set[str]:
    done = set()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    done.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError):  # a line cut by a kill: dropped below
                    pass
    return done


def _drop_partial_lines(path: str) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    good = []
    for line in lines:
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            pass
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in good))


@torch.no_grad()
def greedy_answers(model, prompts: list[list[int]], input_features, generation=None) -> list[list[int]]:
    """
    The model's answer ids (up to the first eos) for a batch of prompt ids, generated together (left-padded);
    `input_features`: the log-mel features of their `<audio>` clips in order (or None).
    """
    width = max(len(ids) for ids in prompts)
    pad = model.config.text_pad_token_id if model.config.text_pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], dtype=torch.long)
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, input_features=input_features, return_audio=False,
        **(generation or {}),
    )
    eos = model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    answers = []
    for row in output.sequences.tolist():  # generated ids only (the prompt went in as embeddings)
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        answers.append(row[: ends[0]] if ends else row)
    return answers


@torch.no_grad()
def precompute_echo_targets(
    model, processor, records, cache_path: str, segment_wise: bool = True, segmentation_mode=None, generation=None,
    batch_size: int = 8, labeler=None,
) -> dict:
    """
    Append a pseudo-labelled record to `cache_path` for every record whose id is not there yet (resumable): the
    model's greedy answer ids (`batch_size` questions generated together), its segments (segment-wise) and the
    stage-II unit-language targets, or `labeler(segment texts)`'s when given. With a list of segmentation modes, the
    answer is generated once and cut by each rule (one record per mode, ids `"<id>#<mode>"`).
    """
    was_training = model.training
    model.eval()
    _drop_partial_lines(cache_path)
    done = _done_ids(cache_path)
    modes = list(segmentation_mode) if isinstance(segmentation_mode, (list, tuple)) else [segmentation_mode]
    policy = EchoXGenerationConfig.from_generation_config(model.generation_config)
    rules = {mode: segmentation_rule(policy, mode) for mode in modes}
    suffix = (lambda mode: f"#{mode}") if len(modes) > 1 else (lambda mode: "")
    boundary = model.text_table[policy.segment_boundary_token_id]
    tokenizer = processor.tokenizer
    pending = [r for r in records if any(r["id"] + suffix(mode) not in done for mode in modes)]
    made = skipped = 0
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    with open(cache_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            prompts = [processor.build_prompt_ids(r.get("prompt") or "", has_audio=bool(r.get("audio"))) for r in batch]
            paths = [r["audio"] for r in batch if r.get("audio")]
            features = extract_features(processor.feature_extractor, paths, processor.max_audio_seconds) if paths else None
            rows = iter(range(len(paths)))
            clips = [next(rows) if r.get("audio") else None for r in batch]  # each record's row of `features`
            answers = greedy_answers(model, prompts, features, generation)
            for record, prompt_ids, clip, answer in zip(batch, prompts, clips, answers):
                if not answer:
                    skipped += 1
                    continue
                todo = [mode for mode in modes if record["id"] + suffix(mode) not in done]
                base = {
                    "audio": record.get("audio"),
                    "transcript": record.get("transcript", ""),
                    "prompt": record.get("prompt", ""),
                    "response": tokenizer.decode(answer, skip_special_tokens=True),
                    "response_ids": answer,
                }
                if not segment_wise:
                    units = labeler([base["response"]]) if labeler else text_to_unit_language(model, [answer])
                    out = {"id": record["id"], **base, "units": units[0]}
                    handle.write(json.dumps(out) + "\n")
                    made += 1
                    continue
                clip_features = features[clip : clip + 1] if clip is not None else None
                states = answer_states(model, prompt_ids, answer, clip_features)
                texts = [tokenizer.decode([token], skip_special_tokens=True) for token in answer]
                scores = boundary_scores(states, boundary)
                spans = {mode: rules[mode].split(scores, texts) for mode in todo}
                # every rule's segments of this answer labelled in one echo-decoder batch
                flat = [span for mode in todo for span in spans[mode]]
                if labeler:
                    units = labeler([tokenizer.decode(answer[a:b], skip_special_tokens=True) for a, b in flat])
                else:
                    units = text_to_unit_language(
                        model, [answer[a:b] for a, b in flat], first_segment=[a == 0 for a, _ in flat]
                    )
                cursor = 0
                for mode in todo:
                    mode_units = units[cursor : cursor + len(spans[mode])]
                    cursor += len(spans[mode])
                    out = {
                        "id": record["id"] + suffix(mode),
                        **base,
                        "segments": [
                            [tokenizer.decode(answer[a:b], skip_special_tokens=True), segment_units]
                            for (a, b), segment_units in zip(spans[mode], mode_units)
                        ],
                        "segment_lengths": [b - a for a, b in spans[mode]],
                    }
                    handle.write(json.dumps(out) + "\n")
                    made += 1
            handle.flush()
    model.train(was_training)
    return {"made": made, "skipped_empty": skipped, "already_done": len(done)}


def append_read_aloud(model, processor, cache_path: str, manifest: str, limit: int | None = None,
                      prompt: str = "Say: {text}", seed: int = 0) -> dict:
    """
    Append read-aloud examples to the stage-III cache (ids `read-<n>`; existing ids are kept): each `{"response",
    "units"}` item of a stage-II `manifest` (a seeded subset of `limit`) as a text-only prompt whose answer is the text
    itself, one segment labelled with the item's unit-language indices.
    """
    with open(manifest, encoding="utf-8") as handle:
        items = [item for item in map(json.loads, handle) if item.get("response", "").strip() and item.get("units")]
    if any(max(item["units"]) >= model.config.unit_vocab_size for item in items):
        raise ValueError(f"{manifest} holds unit-language indices beyond the model's {model.config.unit_vocab_size}.")
    if limit:
        items = random.Random(seed).sample(items, min(limit, len(items)))
    _drop_partial_lines(cache_path)
    done = _done_ids(cache_path)
    made = 0
    with open(cache_path, "a", encoding="utf-8") as handle:
        for index, item in enumerate(items):
            if f"read-{index}" in done:
                continue
            text = item["response"].strip()
            answer = processor.tokenizer(text, add_special_tokens=False).input_ids
            units = list(item["units"])
            record = {"id": f"read-{index}", "audio": None, "transcript": "", "prompt": prompt.format(text=text),
                      "response": text, "response_ids": answer, "segments": [[text, units]],
                      "segment_lengths": [len(answer)]}
            handle.write(json.dumps(record) + "\n")
            made += 1
    return {"read_aloud_made": made}


# --------------------------------------------------------------------------------------------------------- stage
def _as_list(paths):
    return [paths] if isinstance(paths, str) else list(paths)


def load_echo_decoder(model, directory: str) -> dict:
    """Copy the echo decoder of a stage-II checkpoint into `model`; reports how far the two text tables differ."""
    from safetensors import safe_open

    files = [f for f in os.listdir(directory) if f.endswith(".safetensors") and f.startswith("model")]
    if not files:
        raise OSError(f"No model*.safetensors in {directory}.")
    own = model.state_dict()
    loaded, table_diff = {}, None
    table_key = next(k for k in own if k.endswith("lm_head.weight") and k.startswith("language_model"))
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as handle:
            for key in handle.keys():
                if key.startswith("echo_decoder."):
                    loaded[key] = handle.get_tensor(key)
                elif key == table_key:
                    table_diff = float((handle.get_tensor(key).float() - own[key].float()).abs().max())
    expected = {k for k in own if k.startswith("echo_decoder.")}
    if set(loaded) != expected:
        raise ValueError(f"The stage-II checkpoint's echo decoder does not match: missing {sorted(expected - set(loaded))[:5]}")
    model.load_state_dict(loaded, strict=False)
    return {"echo_decoder_from": directory, "text_table_max_abs_diff": table_diff}


def main(config: dict) -> dict:
    model, processor = load_model(config)
    state = PartialState()
    info = {}
    if config.get("echo_decoder_from"):
        info = load_echo_decoder(model, config["echo_decoder_from"])
        if info["text_table_max_abs_diff"] not in (None, 0.0):
            print(f"warning: stage I and stage II text tables differ (max |diff| {info['text_table_max_abs_diff']:.3g}).")
    cache_path = config.get("targets_cache") or os.path.join(config["output_dir"], "echo_targets.jsonl")
    with state.main_process_first():
        if state.is_main_process:
            records = [r for path in _as_list(config["train_manifest"]) for r in read_manifest(path)]
            if config.get("max_examples"):
                records = random.Random(config["training_args"].get("seed", 0)).sample(
                    records, min(config["max_examples"], len(records))
                )
            labeler = None
            if config.get("tts_labels"):
                from .tts_labels import SpokenUnitLabeler

                labeler = SpokenUnitLabeler(**config["tts_labels"])
            report = precompute_echo_targets(
                model,
                processor,
                records,
                cache_path,
                segment_wise=config["segment_wise"],
                segmentation_mode=config.get("segmentation_mode"),
                generation=config.get("generation"),
                batch_size=config["label_batch_size"],
                labeler=labeler,
            )
            if config.get("read_aloud"):
                report.update(append_read_aloud(model, processor, cache_path, seed=config["training_args"].get("seed", 0),
                                                **config["read_aloud"]))
            log_event(config["output_dir"], {"event": "echo_targets", "cache": cache_path, **report, **info})
    dataset = load_dialogue_dataset(cache_path)
    cache = build_feature_cache(model, processor, config, dataset)
    whole = not config["segment_wise"]
    collator = EchoXDataCollator(
        processor,
        model.config,
        stage="echo",
        encoder_cache=cache,
        segment_wise=config["segment_wise"],
        with_ctc=whole,
        max_ctc_length=config["max_ctc_length"],
        max_response_tokens=config["max_response_tokens"],
    )
    model, trainer_kwargs = prepare_trainable(model, config)
    model.train()
    labels = ["labels", "unit_labels"] + (["ctc_labels"] if whole else [])
    return run_trainer(model, processor, config, dataset, collator, labels, "stage3_echo", **trainer_kwargs)


def cli():
    stage_cli(__doc__.strip().splitlines()[0], DEFAULTS, main)


if __name__ == "__main__":
    cli()
