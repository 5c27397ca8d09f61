"""`convert_original`: a synthetic released-EchoX checkpoint (built here with the original's key names, shapes, shard
index, tokenizer additions and config fields) converts bit-exactly, and the converted model computes what the original
definitions compute (reference pieces written below from the original's description, not from its code)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
    pipeline,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_vocoder import (  # noqa: E402
    FAIRSEQ_CONFIG,
    fairseq_generator_state_dict,
    write_fairseq_vocoder,
)

import modeling_echox  # noqa: E402,F401  (registers the Auto classes)
from modeling_echox import EchoXForSpeechToSpeech  # noqa: E402
from modeling_echox.cli import main as cli_main  # noqa: E402
from modeling_echox.convert.fairseq_vocoder import convert_fairseq_vocoder  # noqa: E402
from modeling_echox.convert.original import convert_original
from modeling_echox.convert.original_layout import (
    echo_config_from_original,
    rename_original_key,
    text_config_from_original,
)
from modeling_echox.convert.safetensors_streaming import parse_size
from modeling_echox.testing.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

SR = 16000
SYSTEM = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
T2U_TABLE = "unit_translator.model.embed_tokens.weight"

# Llama-3 has 256 reserved special tokens; the tiny tokenizer gets enough of them for the LLM vocabulary to hold the
# released echo-prefix id 12800, with `<audio_patch>` as the last LLM id (as 128256 is in the released model).
TINY_RESERVED = 12300
TINY_SIZES = dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, whisper_dim=32, unit_model="large")
ABSENT = object()  # a config.json without `unit_model`

# The original's echo decoder presets as tensor sizes (layers, width, heads, kv heads, FFN); `None` kv heads: the LLM's;
# "large" (`None`): 2 layers of the LLM's sizes.
ECHO_SHAPES = {"large": None, "small": (4, 512, 8, None, 2048), "medium": (8, 768, 12, 12, 2048), "absent": (6, 512, 8, None, 2048)}

# Layouts of the output table: (config's tie_word_embeddings, the copies the shards hold besides the LLM embedding E).
# Untied: L (`lm_head.weight`) and / or T (the echo decoder's text table), equal. Tied (E is the LLM's head):
# (a) "tied": neither stored; (b) "tied_lm_head": L stored, equal to E; (c) "tied_t2u": T stored, equal to the head (E);
# "tied_all": L and T stored, both equal to E.
TABLE_LAYOUTS = {
    "lm_head": (False, ["lm_head.weight"]),
    "t2u": (False, [T2U_TABLE]),
    "both": (False, ["lm_head.weight", T2U_TABLE]),
    "tied": (True, []),
    "tied_lm_head": (True, ["lm_head.weight"]),
    "tied_t2u": (True, [T2U_TABLE]),
    "tied_all": (True, ["lm_head.weight", T2U_TABLE]),
}


# --------------------------------------------------------------------------------------- synthetic original checkpoint
def unit_pieces(count: int, num_units: int, seed: int = 0) -> list[str]:
    """Unit-language pieces like the released ones: `▁` at word starts, `_`-joined unit ids, some ids ≥ num_units."""
    rng = np.random.default_rng(seed)
    pieces, seen = [], set()
    while len(pieces) < count:
        units = rng.integers(0, num_units + 4, size=int(rng.integers(1, 4))).tolist()
        piece = ("\u2581" if rng.random() < 0.6 else "") + "_".join(map(str, units))
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return pieces


def original_tensor_shapes(cfg: dict, whisper_dim: int, echo: tuple[int, int, int, int, int]) -> dict[str, tuple]:
    """Key → shape of the released `EchoXForCausalLM` state dict (spec §4), without the tied text-table copies."""
    H, I, V, U = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["unit_vocab_size"]
    kv = cfg["num_key_value_heads"] * H // cfg["num_attention_heads"]
    layers, width, heads, kv_heads, ffn = echo
    head_dim = width // heads
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
    shapes["model.norm.weight"] = (H,)
    a = "model.asr_transformer_encoder.layers.0."
    shapes.update({
        "model.mm_projector1.weight": (H, 2 * whisper_dim), "model.mm_projector1.bias": (H,),
        a + "self_attn.in_proj_weight": (3 * H, H), a + "self_attn.in_proj_bias": (3 * H,),
        a + "self_attn.out_proj.weight": (H, H), a + "self_attn.out_proj.bias": (H,),
        a + "linear1.weight": (2 * H, H), a + "linear1.bias": (2 * H,),
        a + "linear2.weight": (H, 2 * H), a + "linear2.bias": (H,),
        a + "norm1.weight": (H,), a + "norm1.bias": (H,), a + "norm2.weight": (H,), a + "norm2.bias": (H,),
        "model.lbm.encoder_attn.in_proj_weight": (3 * H, H), "model.lbm.encoder_attn.in_proj_bias": (3 * H,),
        "model.lbm.encoder_attn.out_proj.weight": (H, H), "model.lbm.encoder_attn.out_proj.bias": (H,),
        "model.lbm.atten_layer_norm.weight": (H,), "model.lbm.atten_layer_norm.bias": (H,),
        "model.out_norm.weight": (H,), "model.out_norm.bias": (H,),
        "model.audio_feature_head.weight": (V, H),
    })
    for i in range(layers):
        p = f"unit_translator.model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, width),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, width),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, width),
            p + "self_attn.o_proj.weight": (width, heads * head_dim),
            p + "mlp.gate_proj.weight": (ffn, width), p + "mlp.up_proj.weight": (ffn, width),
            p + "mlp.down_proj.weight": (width, ffn),
            p + "input_layernorm.weight": (width,), p + "post_attention_layernorm.weight": (width,),
        })
    shapes.update({
        "unit_translator.model.norm.weight": (width,),
        "unit_translator.unit_embedding.weight": (U, H),
        "unit_translator.adapter.weight": (width, H), "unit_translator.adapter.bias": (width,),
        "unit_translator.lm_head.weight": (V + U, width),
        "unit_translator.aligner_MLP.0.weight": (I, H), "unit_translator.aligner_MLP.0.bias": (I,),
        "unit_translator.aligner_MLP.3.weight": (H, I), "unit_translator.aligner_MLP.3.bias": (H,),
    })
    return shapes


def _random_tensor(key, shape, dtype, generator):
    if re.search(r"(norm\d?|layernorm|atten_layer_norm|out_norm)\.weight$", key):
        return (1 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    fan_in = shape[-1] if len(shape) > 1 else 64
    return (torch.randn(shape, generator=generator) * fan_in**-0.5).to(dtype)


def build_synthetic_original(
    root,
    *,
    hidden,
    intermediate,
    layers,
    heads,
    kv_heads,
    whisper_dim,
    unit_model,
    num_units=FAIRSEQ_CONFIG["num_embeddings"],
    unit_vocab_size=40,
    table="lm_head",
    dtype=torch.float32,
    num_shards=3,
    seed=0,
    whisper_dir=None,
    echo=None,
):
    """
    Write a released-EchoX-like directory `root/echox` (config.json, sharded safetensors + index, tokenizer with
    `<audio_patch>` and the `<|unit_...|>` tokens, fairseq vocoder) and, unless given, a Whisper directory `root/whisper`.
    `table`: the layout of the output table (see `TABLE_LAYOUTS`).
    `unit_model`: the config's `unit_model` (`ABSENT`: no such field); `echo`: the echo decoder's tensor sizes, one of
    `ECHO_SHAPES` (default: those of `unit_model`'s preset).
    Returns `(echox_dir, whisper_dir, tensors)`; tensors are returned only for small checkpoints (else `None`).
    """
    echox_dir = os.path.join(root, "echox")
    os.makedirs(echox_dir, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([f"<|reserved_special_token_{i}|>" for i in range(TINY_RESERVED)], special_tokens=True)
    tokenizer.add_tokens(["<audio_patch>"], special_tokens=True)
    vocab_size = len(tokenizer)
    pieces = unit_pieces(unit_vocab_size, num_units, seed)
    tokenizer.add_tokens([f"<|unit_{piece}|>" for piece in pieces])
    tokenizer.save_pretrained(echox_dir)

    cfg = {
        "architectures": ["EchoXForCausalLM"],
        "model_type": "EchoX",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": TABLE_LAYOUTS[table][0],
        "use_cache": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.eos_token_id],
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.49.0",
        "audio_tower": "./whisper-large-v3",
        "adapter_size": whisper_dim,
        "audio_token_len": 1,
        "unit_output": "finetune_kd",
        "unit_vocab_size": unit_vocab_size,
        "unit_model": unit_model,
    }
    if unit_model is ABSENT:
        del cfg["unit_model"]
    with open(os.path.join(echox_dir, "config.json"), "w") as handle:
        json.dump(cfg, handle, indent=2)

    if echo is None:
        echo = "absent" if unit_model is ABSENT else unit_model if unit_model in ECHO_SHAPES else "medium"
    echo = ECHO_SHAPES[echo] or (2, hidden, heads, kv_heads, intermediate)
    echo = tuple(kv_heads if size is None else size for size in echo)
    shapes = original_tensor_shapes(cfg, whisper_dim, echo)
    tied, table_keys = TABLE_LAYOUTS[table]
    keys = list(shapes)
    # the shards hold the keys in a different order than ours; the table copies go in the first and last shard
    keys = keys[len(keys) // 2 :] + keys[: len(keys) // 2]
    generator = torch.Generator().manual_seed(seed)
    table_tensor = _random_tensor("table", (vocab_size, hidden), dtype, generator)
    keep = sum(shapes[k][0] * (shapes[k][1] if len(shapes[k]) > 1 else 1) for k in keys) < 100_000_000
    tensors = {} if keep else None
    bounds = np.linspace(0, len(keys), num_shards + 1).astype(int)
    weight_map, total = {}, 0
    for shard in range(num_shards):
        name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {key: _random_tensor(key, shapes[key], dtype, generator) for key in keys[bounds[shard] : bounds[shard + 1]]}
        if tied and "model.embed_tokens.weight" in chunk:  # the LLM's embedding is the table
            chunk["model.embed_tokens.weight"] = table_tensor.clone()
        if "unit_translator.lm_head.weight" in chunk:  # like a trained echo decoder, favour unit tokens
            chunk["unit_translator.lm_head.weight"][vocab_size:] *= 8
        if shard == 0 and table_keys:
            chunk[table_keys[0]] = table_tensor
        if shard == num_shards - 1 and len(table_keys) == 2:
            chunk[table_keys[1]] = table_tensor.clone()
        save_file(chunk, os.path.join(echox_dir, name), metadata={"format": "pt"})
        for key, tensor in chunk.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        if tensors is not None:
            tensors.update(chunk)
        del chunk
    with open(os.path.join(echox_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)

    vocoder_cfg = {**FAIRSEQ_CONFIG, "num_embeddings": num_units}
    write_fairseq_vocoder(__import__("pathlib").Path(echox_dir), vocoder_cfg, fairseq_generator_state_dict(vocoder_cfg, seed))

    if whisper_dir is None:
        whisper_dir = os.path.join(root, "whisper")
        whisper_config = WhisperConfig(
            d_model=whisper_dim,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=2 * whisper_dim,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=2 * whisper_dim,
            num_mel_bins=80,
            max_source_positions=1500,
        )
        torch.manual_seed(seed)
        WhisperForConditionalGeneration(whisper_config).save_pretrained(whisper_dir)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper_dir)
    return echox_dir, whisper_dir, tensors


# ---------------------------------------------------------------------------------- reference: the original's pieces
def reference_speech_embeddings(tensors, whisper_dir, features, heads):
    """Whisper encoder → frame pairs → mm_projector1 → asr_transformer_encoder (sequence-first, on [1, 750, H]) →
    out_norm → audio_feature_head argmax → run-collapse → lbm look-back → residual → LayerNorm."""
    encoder = WhisperModel.from_pretrained(whisper_dir).encoder.eval()
    hidden = tensors["model.mm_projector1.weight"].shape[0]

    def load(module, prefix):
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        return module.eval()

    projector = load(nn.Linear(tensors["model.mm_projector1.weight"].shape[1], hidden), "model.mm_projector1.")
    asr = load(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model=hidden, nhead=heads, dim_feedforward=2 * hidden, dropout=0.1, norm_first=True),
            1,
            enable_nested_tensor=False,
        ),
        "model.asr_transformer_encoder.",
    )
    out_norm = load(nn.LayerNorm(hidden), "model.out_norm.")
    head = load(nn.Linear(hidden, tensors["model.audio_feature_head.weight"].shape[0], bias=False), "model.audio_feature_head.")
    lbm = load(nn.MultiheadAttention(hidden, heads, dropout=0.1, batch_first=True), "model.lbm.encoder_attn.")
    lbm_norm = load(nn.LayerNorm(hidden), "model.lbm.atten_layer_norm.")
    with torch.no_grad():
        x = encoder(features).last_hidden_state  # [1, 1500, d]
        x = x.reshape(1, x.shape[1] // 2, 2 * x.shape[2])  # [1, 750, 2d]
        x = asr(projector(x))  # batch_first=False: 750 sequences of length 1
        x = out_norm(x)
        logits = head(x)
        tokens = logits.argmax(-1)[0]
        kept = tokens.roll(1) != tokens
        kept[0] = True
        query = x[:, kept]
        residual = query
        attended, _ = lbm(query, x, x, key_padding_mask=~kept[None])
        attended += residual
        speech = lbm_norm(attended)
    return speech[0], logits[0], kept


def reference_llm(tensors, original_cfg, table):
    fields = {k: v for k, v in original_cfg.items() if k not in ("model_type", "architectures")}
    llm = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    state = {k: v for k, v in tensors.items() if k.startswith("model.") and rename_original_key(k).startswith("language_model.")}
    state["lm_head.weight"] = table
    llm.load_state_dict(state)
    return llm


def reference_echo_decode(tensors, original_cfg, table, h_segment, prefix, suffix, eos, steps):
    """The T2U on one segment: adapter(cat(E[prefix], aligner_MLP(h), E[suffix])) → Llama decoder → lm_head, greedy."""
    fields = {k: v for k, v in original_cfg.items() if k not in ("model_type", "architectures")}
    assert original_cfg["unit_model"] == "large"  # 2 layers, LLM sizes
    t2u_config = LlamaConfig(**{**fields, "num_hidden_layers": 2, "max_position_embeddings": 2048, "pad_token_id": eos})
    t2u = LlamaModel(t2u_config).eval()
    state = {k[len("unit_translator.model.") :]: v for k, v in tensors.items() if k.startswith("unit_translator.model.")}
    state.pop("embed_tokens.weight", None)
    missing, unexpected = t2u.load_state_dict(state, strict=False)
    assert missing == ["embed_tokens.weight"] and not unexpected
    hidden, inner = tensors["unit_translator.aligner_MLP.0.weight"].shape[1], tensors["unit_translator.aligner_MLP.0.weight"].shape[0]
    aligner = nn.Sequential(nn.Linear(hidden, inner), nn.ReLU(), nn.Dropout(0.1), nn.Linear(inner, hidden)).eval()
    aligner.load_state_dict({k[len("unit_translator.aligner_MLP.") :]: v for k, v in tensors.items() if k.startswith("unit_translator.aligner_MLP.")})
    adapter_w, adapter_b = tensors["unit_translator.adapter.weight"], tensors["unit_translator.adapter.bias"]
    joint = torch.cat([table, tensors["unit_translator.unit_embedding.weight"]])

    def embed(ids):
        return nn.functional.linear(joint[torch.tensor(ids)], adapter_w, adapter_b)

    with torch.no_grad():
        x = torch.cat([embed(prefix), nn.functional.linear(aligner(h_segment), adapter_w, adapter_b), embed(suffix)])
        out, first_logits = [], None
        for _ in range(steps):
            states = t2u(inputs_embeds=x[None], attention_mask=torch.ones(1, x.shape[0], dtype=torch.long)).last_hidden_state
            logits = states[0, -1] @ tensors["unit_translator.lm_head.weight"].T
            first_logits = logits if first_logits is None else first_logits
            next_id = int(logits.argmax())
            if next_id == eos:
                break
            out.append(next_id)
            x = torch.cat([x, embed([next_id])])
    return out, first_logits


def reference_units(tokenizer, ids, num_units):
    """The original rule: decode (special tokens kept); with "▁" keep only the unit payloads, joined; every integer < K."""
    text = tokenizer.batch_decode([ids], skip_special_tokens=False)[0]
    if "\u2581" in text:
        text = "".join(re.findall(r"<\|unit_(.*?)\|>", text))
    return [int(n) for n in re.findall(r"\d+", text) if int(n) < num_units]


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("original"))
    echox_dir, whisper_dir, tensors = build_synthetic_original(root, **TINY_SIZES, table="lm_head")
    out = os.path.join(root, "converted")
    convert_original(echox_dir, whisper_dir, out, max_shard_size="1MB")
    return {"root": root, "echox": echox_dir, "whisper": whisper_dir, "tensors": tensors, "out": out}


@pytest.fixture(scope="module")
def loaded(converted):
    model, info = EchoXForSpeechToSpeech.from_pretrained(converted["out"], output_loading_info=True)
    return model.eval(), info


def _read_output(out_dir):
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as handle:
        index = json.load(handle)
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(out_dir, shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():
                assert index["weight_map"][key] == shard
                tensors[key] = handle.get_tensor(key)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, index


def _our_key(key, tied=False):
    """Our name of an original key; the copies of the output table map to our table (the LLM's embedding when tied)."""
    if key in ("lm_head.weight", T2U_TABLE):
        return "language_model.model.embed_tokens.weight" if tied else "language_model.lm_head.weight"
    return rename_original_key(key)


def _assert_bit_exact(original, whisper_dir, echox_dir, out_dir, tied=False):
    """Every original tensor lands unchanged in exactly one of ours; ours are exactly those plus the Whisper encoder,
    the vocoder and the unit table."""
    ours, _ = _read_output(out_dir)
    used = {}
    for key, tensor in original.items():
        target = _our_key(key, tied)
        assert target is not None, key
        assert ours[target].dtype == tensor.dtype and torch.equal(ours[target], tensor), key
        used.setdefault(target, []).append(key)
    duplicates = {k: v for k, v in used.items() if len(v) > 1}
    assert set(duplicates) <= {_our_key("lm_head.weight", tied)}  # only the copies of the tied table
    assert tied == ("language_model.lm_head.weight" not in ours)
    with safe_open(os.path.join(whisper_dir, "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if key.startswith("model.encoder."):
                target = "audio_tower." + key[len("model.encoder.") :]
                assert torch.equal(ours[target], handle.get_tensor(key)), key
                used[target] = [key]
    vocoder = convert_fairseq_vocoder(os.path.join(echox_dir, "g_00500000"), os.path.join(echox_dir, "vocoder_config.json"))
    for key, tensor in vocoder.state_dict().items():
        assert torch.equal(ours["vocoder." + key], tensor), key
        used["vocoder." + key] = [key]
    assert set(ours) == set(used) | {"unit_table"}


# ------------------------------------------------------------------------------------------------------------ tests
def test_conversion_is_bit_exact_and_sharded(converted):
    _assert_bit_exact(converted["tensors"], converted["whisper"], converted["echox"], converted["out"])
    ours, index = _read_output(converted["out"])
    per_shard = {}
    for key, shard in index["weight_map"].items():
        per_shard.setdefault(shard, []).append(ours[key].numel() * ours[key].element_size())
    assert len(per_shard) > 3
    for sizes in per_shard.values():  # at most 1 MB per shard, unless one tensor alone is larger
        assert sum(sizes) <= 10**6 or len(sizes) == 1


def convert_load_generate(echox_dir, whisper_dir, out, tensors, tied=False):
    """Convert, check every tensor bit-exact in the files and in the loaded model, then generate text and speech."""
    convert_original(echox_dir, whisper_dir, out, max_shard_size="5GB")
    _assert_bit_exact(tensors, whisper_dir, echox_dir, out, tied=tied)
    model, info = EchoXForSpeechToSpeech.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    model.eval()
    state = model.state_dict()
    for key, tensor in tensors.items():
        assert torch.equal(state[_our_key(key, tied)], tensor), key
    table = "model.embed_tokens.weight" if tied else "lm_head.weight" if "lm_head.weight" in tensors else T2U_TABLE
    assert torch.equal(model.text_table, tensors[table])
    assert model.config.text_config.tie_word_embeddings == tied
    assert (model.text_table.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    processor = AutoProcessor.from_pretrained(out)
    model.generation_config.echo_max_new_tokens = 8
    inputs = processor(audio=0.1 * np.random.default_rng(0).standard_normal(SR).astype(np.float32), sampling_rate=SR)
    # by default: the released unit reading (the processor's decode_units) and per-segment float32 vocoding
    assert model.generation_config.vocoding_mode == "faithful"
    assert model.config.unit_pieces_split_units and processor.unit_vocabulary.splits_units
    read = []
    decode_units = processor.decode_units
    processor.decode_units = lambda ids: read.append(decode_units(ids)) or read[-1]
    torch.manual_seed(0)
    with torch.no_grad():
        answer = model.generate(**inputs, max_new_tokens=6, processor=processor)
    assert answer.sequences.shape[1] >= 1
    assert len(answer.waveforms) == 1 and answer.waveforms[0].numel() > 0 and torch.isfinite(answer.waveforms[0]).all()
    spoken = [units for units in answer.segment_unit_ids[0] if units]
    assert spoken and spoken == [units for units in read if units]
    with torch.no_grad():
        alone = [model.vocoder(torch.tensor(u), durations=model.vocoder.predict_durations(torch.tensor(u))[0]) for u in spoken]
    expected = torch.cat([out.waveform[0, : out.waveform_lengths[0]].float() for out in alone])
    torch.testing.assert_close(answer.waveforms[0], expected)
    assert {p.dtype for p in model.vocoder.parameters()} == {torch.float32}
    return model


@pytest.mark.parametrize("table", ["t2u", "both", "tied", "tied_lm_head", "tied_t2u", "tied_all"])
def test_table_layouts_convert_load_and_generate(tmp_path, converted, table):
    """Each layout of the output table (see `TABLE_LAYOUTS`; "lm_head" is the module fixture) end to end."""
    echox_dir, _, tensors = build_synthetic_original(
        str(tmp_path), **TINY_SIZES, table=table, dtype=torch.float16, num_shards=2, seed=1, whisper_dir=converted["whisper"]
    )
    tied = TABLE_LAYOUTS[table][0]
    model = convert_load_generate(echox_dir, converted["whisper"], str(tmp_path / "out"), tensors, tied=tied)
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) == 1
    assert model.dtype == torch.float16


def _change_stored(echox_dir, key):
    """Add 1 to one element of the stored tensor `key`, in its shard."""
    with open(os.path.join(echox_dir, "model.safetensors.index.json")) as handle:
        shard = json.load(handle)["weight_map"][key]
    path = os.path.join(echox_dir, shard)
    with safe_open(path, "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[key][3, 5] += 1
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("table", "changed", "named"),
    [
        ("both", T2U_TABLE, "lm_head.weight"),
        ("tied_lm_head", "lm_head.weight", "model.embed_tokens.weight"),
        ("tied_t2u", T2U_TABLE, "model.embed_tokens.weight"),
        ("tied_all", "model.embed_tokens.weight", "lm_head.weight"),
    ],
)
def test_different_table_copies_are_refused(tmp_path, converted, table, changed, named):
    echox_dir, _, _ = build_synthetic_original(
        str(tmp_path), **TINY_SIZES, table=table, num_shards=2, whisper_dir=converted["whisper"]
    )
    _change_stored(echox_dir, changed)
    with pytest.raises(ValueError, match="different values") as error:
        convert_original(echox_dir, converted["whisper"], str(tmp_path / "out"))
    assert changed in str(error.value) and named in str(error.value) and "tied" in str(error.value)
    if table == "tied_lm_head":
        assert "tie_word_embeddings" in str(error.value)


def test_untied_checkpoint_without_output_head_is_refused(tmp_path, converted):
    echox_dir, _, _ = build_synthetic_original(str(tmp_path), **TINY_SIZES, table="tied", num_shards=2, whisper_dir=converted["whisper"])
    config = json.load(open(os.path.join(echox_dir, "config.json")))
    json.dump({**config, "tie_word_embeddings": False}, open(os.path.join(echox_dir, "config.json"), "w"))
    with pytest.raises(ValueError, match="neither lm_head.weight nor unit_translator.model.embed_tokens.weight"):
        convert_original(echox_dir, converted["whisper"], str(tmp_path / "out"))


@pytest.mark.parametrize(
    ("unit_model", "echo", "expected"),
    [
        (ABSENT, "absent", (6, 512, 8, 2, 64, 2048)),  # the original's decoder without unit_model; kv heads: the LLM's
        ("medium", "medium", (8, 768, 12, 12, 64, 2048)),  # the released decoder
        ("small", "small", (4, 512, 8, 2, 64, 2048)),
        (ABSENT, "large", (2, 64, 4, 2, 16, 96)),  # no unit_model, tensors of the LLM's sizes: only its head split fits
    ],
    ids=["absent", "medium", "small", "absent-large-tensors"],
)
def test_unit_model_cases_convert_load_and_generate(tmp_path, converted, unit_model, echo, expected):
    """unit_model absent / "medium" / "small" end to end ("large" is the module fixture); the echo decoder's sizes from
    the preset or, with no unit_model, read off the tensors."""
    sizes = {**TINY_SIZES, "unit_model": unit_model}
    echox_dir, _, tensors = build_synthetic_original(
        str(tmp_path), **sizes, echo=echo, dtype=torch.float16, num_shards=2, seed=3, whisper_dir=converted["whisper"]
    )
    model = convert_load_generate(echox_dir, converted["whisper"], str(tmp_path / "out"), tensors)
    echo_config = model.config.echo_config
    assert (echo_config.num_hidden_layers, echo_config.hidden_size, echo_config.num_attention_heads,
            echo_config.num_key_value_heads, echo_config.head_dim, echo_config.intermediate_size) == expected


def test_loads_without_missing_or_unexpected_keys_and_config(converted, loaded):
    model, info = loaded
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    processor = AutoProcessor.from_pretrained(converted["out"])
    config, tokenizer = model.config, processor.tokenizer
    vocab = tokenizer.get_vocab()
    V = config.text_config.vocab_size
    assert config.audio_token_id == vocab["<audio_patch>"] == V - 1
    assert config.unit_token_offset == V and config.unit_vocab_size == 40 and config.num_units == FAIRSEQ_CONFIG["num_embeddings"]
    eot = vocab["<|eot_id|>"]
    echo = config.echo_config  # unit_model "large": 2 layers of the LLM's sizes, the LLM's RoPE, 2048 positions
    assert config.text_pad_token_id == echo.unit_eos_token_id == eot and config.mask_eot_in_prompt
    assert echo.prefix_quirk_id == 12800
    speaker = [vocab["<|start_header_id|>"], *tokenizer("speaker").input_ids, vocab["<|end_header_id|>"], *tokenizer("\n").input_ids]
    assert echo.prefix_ids == speaker and echo.suffix_ids == [eot, *speaker]
    assert model.generation_config.segment_boundary_token_id == tokenizer(".").input_ids[-1]
    assert model.generation_config.segmentation_mode == "faithful" and model.generation_config.echo_max_new_tokens == 2048
    assert (echo.num_hidden_layers, echo.hidden_size, echo.num_attention_heads, echo.num_key_value_heads) == (2, 64, 4, 2)
    assert echo.max_position_embeddings == 2048
    assert echo.rope_parameters == config.text_config.rope_parameters
    assert config.text_config.rope_parameters["rope_type"] == "llama3" and config.text_config.rope_parameters["rope_theta"] == 5e5
    assert not hasattr(config.text_config, "unit_model") and not hasattr(config.text_config, "audio_tower")
    assert model.generation_config.do_sample and model.generation_config.temperature == 0.2
    assert model.generation_config.top_p == 0.9 and model.generation_config.max_new_tokens == 512
    assert model.generation_config.eos_token_id == eot == model.generation_config.pad_token_id
    pieces = unit_pieces(40, config.num_units)
    assert processor.unit_vocabulary.pieces == pieces
    for i, piece in enumerate(pieces):  # the unit table lists each piece's units < K, -1 padded
        units = [int(n) for n in re.findall(r"\d+", piece) if int(n) < config.num_units]
        assert model.unit_table[i].tolist() == units + [-1] * (config.unit_max_piece_length - len(units))


def test_outputs_match_the_original_definitions(converted, loaded):
    model, _ = loaded
    tensors, original_cfg = converted["tensors"], json.load(open(os.path.join(converted["echox"], "config.json")))
    processor = AutoProcessor.from_pretrained(converted["out"])
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    sh, eh, eot = vocab["<|start_header_id|>"], vocab["<|end_header_id|>"], vocab["<|eot_id|>"]

    def tok(text):
        return tokenizer(text).input_ids

    # the prompt of the original: every piece tokenized on its own (BOS each), "\n<audio_patch>" in the user turn
    prompt = (
        tok("") + [sh] + tok("system") + [eh] + tok("\n") + tok(SYSTEM) + [eot]
        + [sh] + tok("user") + [eh] + tok("\n<audio_patch>") + tok("") + [eot]
        + [sh] + tok("assistant") + [eh] + tok("\n")
    )
    rng = np.random.default_rng(3)
    audio = np.concatenate([np.zeros(SR, np.float32), 0.1 * rng.standard_normal(SR).astype(np.float32)])
    inputs = processor(audio=audio, sampling_rate=SR)
    assert inputs["input_ids"][0].tolist() == prompt

    # speech adapter
    speech, ctc_logits, kept = reference_speech_embeddings(tensors, converted["whisper"], inputs["input_features"], heads=4)
    with torch.no_grad():
        ours = model.get_speech_embeddings(inputs["input_features"])
    assert torch.allclose(ours.ctc_logits[0], ctc_logits, atol=1e-4)
    assert 1 < int(kept.sum()) < 750  # the collapse did something
    assert ours.speech_embeddings[0].shape == speech.shape
    assert torch.allclose(ours.speech_embeddings[0], speech, atol=1e-4)

    # LLM: speech spliced at <audio_patch>, attention_mask = ids != pad (every eot of the prompt masked)
    ids = torch.tensor(prompt)
    at = prompt.index(model.config.audio_token_id)
    table = tensors["lm_head.weight"]
    llm = reference_llm(tensors, original_cfg, table)
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:at], speech, embeds[at + 1 :]])[None]
        expanded = torch.cat([ids[:at], ids.new_full((speech.shape[0],), model.config.audio_token_id), ids[at + 1 :]])
        reference = llm(inputs_embeds=embeds, attention_mask=(expanded != tokenizer.pad_token_id).long()[None], output_hidden_states=True)
        output = model(**inputs)
    assert (expanded == eot).sum() >= 2
    assert torch.allclose(output.logits, reference.logits, atol=1e-4)

    # echo decoder on the last hidden states (prefix with the 12800 quirk; eot + speaker-header suffix), greedy
    h_segment = reference.hidden_states[-1][0, -6:]
    prefix = [sh, *tok("speaker"), eh, *tok("\n"), 12800]
    suffix = [eot, sh, *tok("speaker"), eh, *tok("\n")]
    expected_ids, first_logits = reference_echo_decode(tensors, original_cfg, table, h_segment, prefix, suffix, eot, steps=10)
    with torch.no_grad():
        ours_ids = model.echo_decoder.generate([h_segment], model.text_table, max_new_tokens=10)[0]
        prompt_embeds = model.echo_decoder.segment_embeddings(model.echo_decoder.denoiser(h_segment), model.text_table)
        our_logits, _ = model.echo_decoder(prompt_embeds[None])
    assert torch.allclose(our_logits[0, -1], first_logits, atol=1e-4)
    assert ours_ids == expected_ids

    # unit decoding: the original's string rule, by the processor; the per-piece table only where it agrees
    offset, K = model.config.unit_token_offset, model.config.num_units
    assert (processor.unit_token_offset, processor.num_units) == (offset, K)
    assert processor.decode_units(expected_ids) == reference_units(tokenizer, expected_ids, K)
    assert sum(i >= offset for i in expected_ids) >= 3
    pieces = processor.unit_vocabulary.pieces
    marked = [i for i, p in enumerate(pieces) if p.startswith("\u2581")]
    plain = [i for i, p in enumerate(pieces) if not p.startswith("\u2581")]
    digits = tok("12 and 3")[1:]
    assert model.config.unit_pieces_split_units == processor.unit_vocabulary.splits_units
    for sequence in (
        expected_ids,
        [offset + marked[0], offset + plain[0], *digits, offset + marked[1]],
        [offset + i for i in range(len(pieces))],
        [offset + plain[1], offset + marked[2], offset + plain[2]],
    ):
        assert processor.decode_units(sequence) == reference_units(tokenizer, sequence, K)
        if model.config.unit_pieces_split_units:
            with pytest.raises(ValueError, match="splits unit ids"):
                model.units_from_echo_ids(sequence)


def test_automodel_save_reload_generate(converted, tmp_path):
    model = AutoModel.from_pretrained(converted["out"]).eval()
    assert type(model) is EchoXForSpeechToSpeech
    assert model.config.auto_map["AutoModel"] == "modeling_echox.EchoXForSpeechToSpeech"
    assert os.path.isfile(os.path.join(converted["out"], "modeling_echox.py"))
    processor = AutoProcessor.from_pretrained(converted["out"])
    model.generation_config.echo_max_new_tokens = 6
    inputs = processor(audio=0.1 * np.random.default_rng(0).standard_normal(SR).astype(np.float32), sampling_rate=SR)
    if model.config.unit_pieces_split_units:  # the released unit language is read by the processor only
        with pytest.raises(ValueError, match="pass `processor=`"):
            model.generate(**inputs, max_new_tokens=5, tokenizer=processor.tokenizer)
    torch.manual_seed(0)
    first = model.generate(**inputs, max_new_tokens=5, processor=processor)
    assert first.sequences.shape[1] >= 1 and len(first.waveforms) == 1
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    reloaded = AutoModel.from_pretrained(tmp_path / "again").eval()
    assert reloaded.generation_config.echo_max_new_tokens == 6  # saved in generation_config.json
    torch.manual_seed(0)
    second = reloaded.generate(**inputs, max_new_tokens=5, processor=processor)
    assert torch.equal(first.sequences, second.sequences) and first.unit_ids == second.unit_ids

    # and through pipeline("speech-to-speech") on the re-saved checkpoint (echo decoder length in its generation config)
    speech_to_speech = pipeline("speech-to-speech", model=str(tmp_path / "again"))
    torch.manual_seed(0)
    clip = 0.1 * np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    answer = speech_to_speech(clip, sampling_rate=SR, generate_kwargs={"max_new_tokens": 5})
    assert set(answer) == {"text", "audio", "sampling_rate"} and answer["sampling_rate"] == 16000
    assert answer["audio"].dtype == np.float32


def test_cli_convert_original_and_dtype(tmp_path, converted, capsys):
    out = str(tmp_path / "bf16")
    code = cli_main(["convert-original", "--echox", converted["echox"], "--whisper", converted["whisper"], "--out", out,
                     "--vocoder-checkpoint", os.path.join(converted["echox"], "g_00500000"), "--dtype", "bfloat16",
                     "--max-shard-size", "2MB"])
    assert code == 0, capsys.readouterr().err
    ours, _ = _read_output(out)
    assert ours["language_model.lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(ours["language_model.lm_head.weight"], converted["tensors"]["lm_head.weight"].to(torch.bfloat16))
    assert ours["unit_table"].dtype == torch.long
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    # converting again into the same directory with fewer shards leaves no stale shard behind
    convert_original(converted["echox"], converted["whisper"], out, max_shard_size="5GB")
    assert [f for f in os.listdir(out) if f.endswith(".safetensors")] == ["model-00001-of-00001.safetensors"]
    with pytest.raises(ValueError, match="must not be an input"):
        convert_original(converted["echox"], converted["whisper"], converted["echox"])
    assert cli_main(["convert-original", "--echox", str(tmp_path), "--whisper", converted["whisper"], "--out", out]) == 2


def test_refusals(tmp_path, converted):
    echox_dir, whisper_dir = converted["echox"], converted["whisper"]
    broken = tmp_path / "echox"
    subprocess.run(["cp", "-r", echox_dir, str(broken)], check=True)
    config = json.load(open(broken / "config.json"))
    json.dump({**config, "vocab_size": config["vocab_size"] + 1}, open(broken / "config.json", "w"))
    with pytest.raises(ValueError, match="vocab_size"):
        convert_original(str(broken), whisper_dir, str(tmp_path / "out"))
    # a unit_model whose preset is not the checkpoint's echo decoder (2 layers of the LLM's sizes): refused, naming both
    json.dump({**config, "unit_model": "medium"}, open(broken / "config.json", "w"))
    with pytest.raises(ValueError, match=r"unit_model='medium'.*8 layers of width 768.*tensors are 2 layers of width 64"):
        convert_original(str(broken), whisper_dir, str(tmp_path / "out"))
    json.dump(config, open(broken / "config.json", "w"))
    os.remove(broken / "g_00500000")
    with pytest.raises(OSError, match="vocoder"):
        convert_original(str(broken), whisper_dir, str(tmp_path / "out"))
    # a tokenizer without <audio_patch>
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(broken)
    with pytest.raises(ValueError, match="<audio_patch>"):
        convert_original(str(broken), whisper_dir, str(tmp_path / "out"), vocoder_checkpoint=os.path.join(echox_dir, "g_00500000"))


def test_echo_decoder_presets():
    """The original's presets by unit_model (the tensors must agree), and the sizes read off the tensors without it."""
    text = text_config_from_original({"vocab_size": 10, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                      "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 5e5, "unit_model": "x"})

    def shapes(layers, width, q, k, ffn):
        result = {"unit_translator.model.norm.weight": (width,)}
        for i in range(layers):
            result[f"unit_translator.model.layers.{i}.self_attn.q_proj.weight"] = (q, width)
            result[f"unit_translator.model.layers.{i}.self_attn.k_proj.weight"] = (k, width)
            result[f"unit_translator.model.layers.{i}.mlp.gate_proj.weight"] = (ffn, width)
        return result

    def sizes(original, tensor_shapes):
        echo = echo_config_from_original(original, text, tensor_shapes)
        return (echo["num_hidden_layers"], echo["hidden_size"], echo["num_attention_heads"], echo["num_key_value_heads"],
                echo["head_dim"], echo["intermediate_size"])

    medium, small, absent, large = shapes(8, 768, 768, 768, 2048), shapes(4, 512, 512, 512, 2048), shapes(6, 512, 512, 512, 2048), shapes(2, 4096, 4096, 1024, 14336)
    for unit_model in ("medium", "x", None, "tiny"):  # any other string, or null: the released 8×768 decoder
        assert sizes({"unit_model": unit_model}, medium) == (8, 768, 12, 12, 64, 2048)
    echo = echo_config_from_original({"unit_model": "medium"}, text, medium)
    assert echo["rope_parameters"]["rope_theta"] == 5e5 and echo["max_position_embeddings"] == 2048
    assert sizes({"unit_model": "small"}, small) == (4, 512, 8, 8, 64, 2048)  # kv heads: the LLM's
    assert sizes({"unit_model": "tiny"}, small) == (4, 512, 8, 8, 64, 2048)  # "small" before the original renamed it
    assert sizes({"unit_model": "large"}, large) == (2, 4096, 32, 8, 128, 14336)
    assert sizes({}, absent) == (6, 512, 8, 8, 64, 2048)
    # no unit_model: read off the tensors (head size 64, as every preset but "large")
    assert sizes({}, medium) == (8, 768, 12, 12, 64, 2048)
    assert sizes({}, small) == (4, 512, 8, 8, 64, 2048)
    assert sizes({}, shapes(3, 640, 640, 128, 1024)) == (3, 640, 10, 2, 64, 1024)

    # unit_model present: the tensors must be the preset's
    for unit_model, tensor_shapes, preset in (("medium", absent, "8 layers of width 768"), (None, small, "8 layers of width 768"),
                                              ("small", medium, "4 layers of width 512"), ("large", medium, "2 layers of width 4096"),
                                              ("tiny", absent, "8 layers of width 768 (q_proj 768 rows, k_proj 768 rows, FFN 2048) or 4 layers")):
        with pytest.raises(ValueError, match=re.escape(f"unit_model={unit_model!r}")) as error:
            echo_config_from_original({"unit_model": unit_model}, text, tensor_shapes)
        assert preset in str(error.value) and "tensors are" in str(error.value)
    with pytest.raises(ValueError, match="tensors are 6 layers of width 512"):  # the decoder of a config without unit_model
        echo_config_from_original({"unit_model": "small"}, text, absent)
    with pytest.raises(ValueError, match=r"k_proj 512 rows.*tensors are 4 layers of width 512 \(q_proj 512 rows, k_proj 256 rows"):
        echo_config_from_original({"unit_model": "small"}, text, shapes(4, 512, 512, 256, 2048))  # another head split

    # unit_model absent, and the rows do not tell the heads
    with pytest.raises(ValueError, match="ambiguous") as error:  # the LLM's width: 32 heads of 128 or 64 heads of 64
        echo_config_from_original({}, text, large)
    assert "32 heads / 8 kv heads of size 128" in str(error.value) and "64 heads / 16 kv heads of size 64" in str(error.value)
    assert "unit_model" in str(error.value)
    with pytest.raises(ValueError, match="fit none of the original's head splits"):
        echo_config_from_original({}, text, shapes(2, 600, 600, 600, 2048))
    gap = shapes(3, 768, 768, 768, 2048)
    gap["unit_translator.model.layers.5.mlp.gate_proj.weight"] = (2048, 768)
    with pytest.raises(ValueError, match=r"numbered \[0, 1, 2, 5\]"):
        echo_config_from_original({"unit_model": "medium"}, text, gap)
    with pytest.raises(ValueError, match="no echo decoder tensor unit_translator.model.norm.weight"):
        echo_config_from_original({"unit_model": "medium"}, text, {})
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
