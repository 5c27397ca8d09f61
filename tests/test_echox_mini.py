"""EchoX-mini assembly: the trained parts round-trip through export → rebuild over the installed base weights."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modeling_echox.mini.assembly import (
    BUILD_MARKER,
    DERIVED,
    PARTS_FILE,
    build_mini,
    build_mini_base,
    default_mini_dir,
    ensure_mini,
    export_mini_parts,
    load_mini_parts,
    mini_is_built,
)
from modeling_echox.model.loading import load_echox
from modeling_echox.model.processing_echox import EchoXProcessor
from modeling_echox.model.unit_vocabulary import EchoXUnitVocabulary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 'trained' EchoX-mini: random EchoX parts plus a rank-4 change of two LLM projections, exported."""
    vocabulary = EchoXUnitVocabulary(["0", "1", "2", "▁3_4", "5"] + [str(u) for u in range(6, 20)] + ["3", "4"])
    model, processor = build_mini_base(vocabulary, 20, seed=3)
    generator = torch.Generator().manual_seed(0)
    changed = ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.5.self_attn.v_proj.weight"]
    with torch.no_grad():
        for name in changed:
            weight = model.get_parameter(name)
            left = torch.randn(weight.shape[0], 4, generator=generator) * 0.05
            right = torch.randn(4, weight.shape[1], generator=generator) * 0.05
            weight.add_(left @ right)
    parts = tmp_path_factory.mktemp("parts")
    sizes = export_mini_parts(model, processor, str(parts), metadata={"note": "test"})
    return model, processor, str(parts), sizes, changed


def test_base_is_whisper_tiny_and_smollm2(trained):
    model, processor, *_ = trained
    config = model.config
    assert config.audio_config.max_source_positions == 500 and processor.max_audio_seconds == 10.0
    assert config.unit_token_offset == config.text_config.vocab_size == 49153
    assert processor.tokenizer.convert_ids_to_tokens(config.audio_token_id) == "<audio>"
    for target, source in DERIVED.items():
        assert torch.equal(model.state_dict()[target], model.state_dict()[source])
    assert model.unit_table[3].tolist()[:2] == [3, 4]


def test_parts_are_small_and_rebuild_the_model(trained):
    model, _, parts, sizes, changed = trained
    assert sizes["low_rank_changes"] == 2
    with open(os.path.join(parts, "parts.json")) as handle:
        assert sorted(json.load(handle)["low_rank_changes"]) == sorted(changed)
    stored = load_file(os.path.join(parts, PARTS_FILE))
    assert model.echo_decoder.token_spelling.any() and "echo_decoder.token_spelling" not in stored  # from the tokenizer
    rebuilt, processor = load_mini_parts(parts)
    original, restored = model.state_dict(), rebuilt.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.allclose(tensor.float(), restored[name].float(), atol=2e-3, rtol=1e-3), name
    assert processor.system_prompt == trained[1].system_prompt
    assert len(processor.unit_vocabulary) == len(trained[1].unit_vocabulary)


def test_a_trained_ctc_head_is_stored_as_its_kept_rows_and_a_low_rank_change(trained, tmp_path):
    """The hearing stage's head (the output table + a rank-r change, zero outside the corpus's tokens) round-trips."""
    model, processor, *_ = trained
    name = "speech_adapter.ctc_head.weight"
    head = model.state_dict()[name].clone()
    generator = torch.Generator().manual_seed(1)
    kept = torch.zeros(len(head), dtype=torch.bool)
    kept[torch.randperm(len(head), generator=generator)[:500]] = True
    change = torch.randn(len(head), 3, generator=generator) @ torch.randn(3, head.shape[1], generator=generator)
    trained_head = torch.where(kept[:, None], head + 0.01 * change, torch.zeros_like(head))
    with torch.no_grad():
        model.speech_adapter.ctc_head.weight.copy_(trained_head)
    try:
        export_mini_parts(model, processor, str(tmp_path / "parts"))
    finally:
        with torch.no_grad():
            model.speech_adapter.ctc_head.weight.copy_(head)
    stored = load_file(str(tmp_path / "parts" / PARTS_FILE))
    assert stored[f"{name}.delta_left"].shape == (len(head), 3) and len(stored[f"{name}.kept_rows"]) == 500
    with open(tmp_path / "parts" / "parts.json") as handle:
        assert json.load(handle)["trained_derived"] == [name]
    rebuilt, _ = load_mini_parts(str(tmp_path / "parts"))
    restored = rebuilt.state_dict()[name]
    assert not restored[~kept].any()
    torch.testing.assert_close(restored, trained_head, atol=2e-3, rtol=1e-3)


def test_build_writes_a_loadable_checkpoint(trained, tmp_path):
    parts = trained[2]
    out = build_mini(str(tmp_path / "mini"), parts_dir=parts)
    assert os.path.isfile(os.path.join(out, BUILD_MARKER))
    model, processor = load_echox(out)
    assert model.config.num_units == 20 and processor.prompt_format == "chat_template"


def test_ensure_mini_builds_once_per_version_of_the_parts(trained, tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    shutil.copytree(trained[2], parts)
    from modeling_echox.mini.base_weights import default_cache_dir

    (tmp_path / "cache").mkdir()
    if os.path.isdir(os.path.join(default_cache_dir(), "smollm2")):  # reuse the converted base LLM
        os.symlink(os.path.join(default_cache_dir(), "smollm2"), tmp_path / "cache" / "smollm2")
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    first = default_mini_dir(str(parts))
    assert first.startswith(str(tmp_path / "cache")) and os.path.basename(first).startswith("echox-mini-")
    monkeypatch.chdir(parts)
    assert default_mini_dir(str(parts)) == first  # does not depend on the working directory

    assert ensure_mini(parts_dir=str(parts)) == first and mini_is_built(first, str(parts))
    marker = os.path.getmtime(os.path.join(first, BUILD_MARKER))
    assert ensure_mini(parts_dir=str(parts)) == first
    assert os.path.getmtime(os.path.join(first, BUILD_MARKER)) == marker  # reused, not rebuilt

    with open(parts / "parts.json", "a", encoding="utf-8") as handle:
        handle.write("\n")  # a new version of the parts
    assert not mini_is_built(first, str(parts))
    second = ensure_mini(parts_dir=str(parts))
    assert second != first and mini_is_built(second, str(parts))
    builds = [name for name in os.listdir(tmp_path / "cache") if name.startswith("echox-mini-")]
    assert sorted(builds) == sorted([os.path.basename(first), os.path.basename(second)])


def test_interrupted_build_leaves_no_checkpoint(trained, tmp_path, monkeypatch):
    out = tmp_path / "mini"

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(EchoXProcessor, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        build_mini(str(out), parts_dir=trained[2])
    assert not out.exists() and os.listdir(tmp_path) == []


def test_export_refuses_untracked_base_changes(trained, tmp_path):
    model, processor, *_ = trained
    norm = model.language_model.model.norm.weight
    with torch.no_grad():
        norm[0] += 1.0
    try:
        with pytest.raises(ValueError, match="low-rank"):
            export_mini_parts(model, processor, str(tmp_path / "b"))
    finally:
        with torch.no_grad():
            norm[0] -= 1.0


def test_missing_parts_are_named(trained, tmp_path):
    parts = tmp_path / "broken"
    parts.mkdir()
    for name in os.listdir(trained[2]):
        if name != PARTS_FILE:
            (parts / name).write_bytes((open(os.path.join(trained[2], name), "rb")).read())
    with pytest.raises(FileNotFoundError, match=PARTS_FILE):
        load_mini_parts(str(parts))


def test_carry_over_stage1_takes_adapter_and_llm_from_the_parts(trained, tmp_path):
    from training.mini_carry_over import carry_over_stage1

    model, processor, parts, _, changed = trained
    base_model, base_processor = build_mini_base(processor.unit_vocabulary, 20, seed=11)
    base_model.save_pretrained(tmp_path / "base")
    base_processor.save_pretrained(tmp_path / "base")
    carry_over_stage1(parts, str(tmp_path / "base"), str(tmp_path / "final"))
    final, _ = load_echox(str(tmp_path / "final"))
    state, trained_state, base_state = final.state_dict(), model.state_dict(), base_model.state_dict()
    for name in changed + ["speech_adapter.projector.weight", "speech_adapter.look_back.in_proj_weight"]:
        assert torch.allclose(state[name], trained_state[name], atol=2e-3), name
        assert not torch.allclose(state[name], base_state[name], atol=2e-3), name
    for name in ("echo_decoder.decoder.layers.0.mlp.up_proj.weight", "vocoder.unit_embedding.weight"):
        assert torch.equal(state[name], base_state[name]), name


def test_carry_over_units_and_the_refitted_unit_language_check(trained, tmp_path):
    from modeling_echox.units.unit_language import train_unit_language
    from training.mini_carry_over import carry_over_units, check_carried_unit_language

    with pytest.raises(FileNotFoundError, match="unit k-means"):
        carry_over_units(trained[2], str(tmp_path / "units"))
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "unit_kmeans.json").write_text("{}")
    (parts / "unit_kmeans.safetensors").write_bytes(b"k")
    carry_over_units(str(parts), str(tmp_path / "units"))
    assert sorted(os.listdir(tmp_path / "units")) == ["unit_kmeans.json", "unit_kmeans.safetensors"]

    sequences = [[(7 * i + j) % 20 for j in range(30)] for i in range(40)]
    language = train_unit_language(sequences, 40, "bpe", num_units=20)
    language.save_pretrained(str(tmp_path / "units" / "unit_language"))
    language.to_vocabulary().save_pretrained(str(parts))
    check_carried_unit_language(str(parts), str(tmp_path / "units"))
    other = train_unit_language(sequences[:20], 30, "bpe", num_units=20, hard_vocab_limit=False)
    other.to_vocabulary().save_pretrained(str(parts))
    with pytest.raises(SystemExit, match="differs"):
        check_carried_unit_language(str(parts), str(tmp_path / "units"))


def test_recipe_carries_over_only_units_vocoder_and_stage1(tmp_path):
    from training.echox_mini import run

    with pytest.raises(ValueError, match="stage2"):
        run(str(tmp_path), carry_over=str(tmp_path), carry=("units", "stage2"))
    assert not os.listdir(tmp_path)


def test_recipe_refuses_unknown_steps_to_skip(tmp_path):
    from training.echox_mini import run

    with pytest.raises(ValueError, match="stage9"):
        run(str(tmp_path), skip=("stage2", "stage9"))
    assert not os.listdir(tmp_path)


def test_hearing_swap_takes_the_adapter_and_the_base_llm_and_keeps_the_rest(trained, tmp_path):
    from safetensors.torch import save_file

    from training.hearing_swap import swap_hearing

    model, processor, parts, _, changed = trained
    mini = build_mini(str(tmp_path / "mini"), parts_dir=parts)
    generator = torch.Generator().manual_seed(5)
    state = model.state_dict()
    heard = {name: torch.randn(state[name].shape, generator=generator)
             for name in ("speech_adapter.projector.weight", "speech_adapter.ctc_head.weight")}
    save_file(heard, str(tmp_path / "hearing_adapter.safetensors"))
    out = swap_hearing(str(tmp_path / "hearing_adapter.safetensors"), str(tmp_path / "swapped"), llm="base",
                       mini_dir=mini)
    swapped, _ = load_echox(out)
    assert swapped.config.adapter_output == "dictation" and swapped.speech_adapter.output == "dictation"
    result, mini_state = swapped.state_dict(), load_echox(mini)[0].state_dict()
    base_state = build_mini_base(processor.unit_vocabulary, 20, seed=3)[0].state_dict()
    for name, tensor in heard.items():
        assert torch.equal(result[name], tensor), name
    for name in changed:  # the LLM is the base again, without the trained change
        assert torch.equal(result[name], base_state[name]) and not torch.equal(result[name], mini_state[name]), name
    for name in ("echo_decoder.decoder.layers.0.mlp.up_proj.weight", "speech_adapter.look_back.in_proj_weight"):
        assert torch.equal(result[name], mini_state[name]), name
    with pytest.raises(ValueError, match="llm"):
        swap_hearing(str(tmp_path / "hearing_adapter.safetensors"), str(tmp_path / "x"), llm="other", mini_dir=mini)
