"""Tests of the unit vocoder `EchoXCodeHifiGan` and of the fairseq CodeHiFiGAN converter."""

import json
import math
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from modeling_echox.convert.fairseq_vocoder import (
    convert_fairseq_vocoder,
    vocoder_config_from_fairseq,
)
from modeling_echox.model.configuration_echox import EchoXVocoderConfig
from modeling_echox.model.vocoder import EchoXCodeHifiGan, EchoXVocoderOutput

TINY = {
    "num_units": 20,
    "unit_embed_dim": 16,
    "upsample_initial_channel": 32,
    "upsample_rates": [2, 3],
    "upsample_kernel_sizes": [4, 7],
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
}
HOP = 6
MULTI_SPEAKER = {"num_speakers": 3, "spkr_embed_dim": 8}
# (kernel - rate) odd: each upsampling stage adds one sample
ODD_UPSAMPLING = {"upsample_rates": [2, 3], "upsample_kernel_sizes": [5, 6]}


def make_vocoder(seed: int = 0, **overrides) -> EchoXCodeHifiGan:
    """Tiny vocoder whose weights are scaled so that waveforms are O(0.1) and predicted durations vary."""
    torch.manual_seed(seed)
    model = EchoXCodeHifiGan(EchoXVocoderConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 and "embedding" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
        model.dur_predictor.proj.weight.normal_(0.0, 0.2)
        model.dur_predictor.proj.bias.fill_(0.8)
    return model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convolutions are dominated by thread hand-off on a shared 2-core machine: run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


UNITS = torch.tensor([[3, 7, 1, 19, 0, 5, 2], [4, 4, 9, 11, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])


# --------------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("generator", ["hifigan", "istft"])
def test_forward_shapes_and_hop_length(generator):
    model, hop, min_std = (make_vocoder(), HOP, 1e-2) if generator == "hifigan" else (make_istft_vocoder(), ISTFT_HOP, 1e-3)
    durations = torch.tensor([[1, 2, 3, 1, 1, 2, 1], [2, 2, 1, 1, 0, 0, 0], [4, 9, 9, 9, 9, 9, 9]])
    output = model(UNITS, attention_mask=MASK, durations=durations)

    assert isinstance(output, EchoXVocoderOutput)
    assert model.config.hop_length == hop
    assert output.waveform_lengths.tolist() == [11 * hop, 6 * hop, 4 * hop]
    assert output.waveform.shape == (3, 11 * hop) and output.waveform.dtype == torch.float32
    assert output.waveform.abs().max() <= 1.0 and output.waveform.std() > min_std
    assert torch.all(output.waveform[1, 6 * hop :] == 0) and torch.all(output.waveform[2, 4 * hop :] == 0)

    single = model(UNITS[1, :4])
    assert single.waveform.shape == (1, single.waveform_lengths.item())


@pytest.mark.parametrize(
    "overrides", [{}, MULTI_SPEAKER, ODD_UPSAMPLING], ids=["tiny", "multi-speaker", "odd-upsampling"]
)
def test_batched_equals_unbatched(overrides):
    model = make_vocoder(**overrides)
    speaker_ids = torch.tensor([2, 0, 1]) if overrides.get("num_speakers") else None
    with torch.no_grad():
        batched = model(UNITS, attention_mask=MASK, speaker_id=speaker_ids)
        durations = model.predict_durations(UNITS, attention_mask=MASK)
    assert durations.max() > 1, "the test should exercise durations > 1"
    assert torch.equal(durations == 0, MASK == 0)

    for row in range(len(UNITS)):
        length = int(MASK[row].sum())
        speaker = None if speaker_ids is None else int(speaker_ids[row])
        with torch.no_grad():
            alone = model(UNITS[row, :length], speaker_id=speaker)
        samples = int(alone.waveform_lengths[0])
        assert alone.waveform.shape == (1, samples)
        assert batched.waveform_lengths[row] == samples
        torch.testing.assert_close(batched.waveform[row, :samples], alone.waveform[0], atol=1e-5, rtol=0)
        assert torch.all(batched.waveform[row, samples:] == 0)
        assert torch.equal(durations[row, :length], model.predict_durations(UNITS[row, :length])[0])


def test_left_padding_equals_unbatched():
    model = make_vocoder()
    units = torch.tensor([[0, 0, 4, 4, 9, 11], [3, 7, 1, 19, 0, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        batched = model(units, attention_mask=mask)
        alone = model(units[0, 2:])
    samples = int(alone.waveform_lengths[0])
    torch.testing.assert_close(batched.waveform[0, :samples], alone.waveform[0], atol=1e-5, rtol=0)


def test_given_vs_predicted_durations():
    model = make_vocoder()
    units = UNITS[0]
    with torch.no_grad():
        predicted = model.predict_durations(units)[0]
        embeds = model.unit_embedding(units[None])
        log_durations = model.dur_predictor(embeds)[0]  # transformers' module, unbatched: no padding to mask
    assert torch.equal(predicted, torch.clamp(torch.round(torch.exp(log_durations) - 1).long(), min=1))

    with torch.no_grad():
        default = model(units)
        forced = model(units, durations=predicted)
        longer = model(units, durations=predicted + 1)
        # the plain HiFi-GAN of transformers on the expanded frames
        frames = torch.repeat_interleave(embeds, predicted, dim=1).transpose(1, 2)
        plain = model.hifi_gan(frames)
    assert torch.equal(default.waveform, forced.waveform)
    torch.testing.assert_close(default.waveform, plain, atol=1e-6, rtol=0)
    assert longer.waveform_lengths.item() == (predicted + 1).sum().item() * HOP


def test_synthesize():
    model = make_vocoder()
    waveform = model.synthesize([3, 7, 1, 19])
    reference = model(torch.tensor([3, 7, 1, 19]))
    assert waveform.dim() == 1 and not waveform.requires_grad
    assert torch.equal(waveform, reference.waveform[0, : reference.waveform_lengths[0]])


def test_save_pretrained_round_trip(tmp_path):
    model = make_vocoder(**MULTI_SPEAKER)
    model.save_pretrained(tmp_path)
    loaded = EchoXCodeHifiGan.from_pretrained(tmp_path).eval()

    loaded_config, config = loaded.config.to_dict(), model.config.to_dict()
    loaded_config.pop("_name_or_path"), config.pop("_name_or_path")
    assert loaded_config == config
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[key], loaded_state[key]) for key in original_state)
    with torch.no_grad():
        assert torch.equal(model(UNITS, MASK, speaker_id=1).waveform, loaded(UNITS, MASK, speaker_id=1).waveform)


def test_weight_norm_round_trip():
    model = make_vocoder()
    with torch.no_grad():
        reference = model(UNITS, MASK).waveform
        model.apply_weight_norm()
        assert hasattr(model.hifi_gan.upsampler[0], "parametrizations")
        with_norm = model(UNITS, MASK).waveform
        model.remove_weight_norm()
        assert not hasattr(model.hifi_gan.upsampler[0], "parametrizations")
        without_norm = model(UNITS, MASK).waveform
    torch.testing.assert_close(with_norm, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(without_norm, reference, atol=1e-6, rtol=0)


BAD_INPUTS = {
    "empty": (lambda m: m(torch.tensor([], dtype=torch.long)), "Empty unit sequence"),
    "empty-list": (lambda m: m.synthesize([]), "Empty unit sequence"),
    "empty-mask": (lambda m: m(UNITS, attention_mask=MASK * torch.tensor([[1], [0], [1]])), "Empty unit sequence"),
    "id-too-large": (lambda m: m(torch.tensor([1, 20])), r"Unit ids must be in \[0, 20\)"),
    "id-negative": (lambda m: m.synthesize([1, -1]), r"Unit ids must be in \[0, 20\)"),
    "float-ids": (lambda m: m(torch.tensor([1.0, 2.0])), "integer tensor of unit ids"),
    "3d-ids": (lambda m: m(UNITS[None]), "shape"),
    "mask-shape": (lambda m: m(UNITS, attention_mask=MASK[:, :3]), "attention_mask shape"),
    "speaker-on-single": (lambda m: m.synthesize([1, 2], speaker_id=0), "single-speaker"),
    "durations-shape": (lambda m: m(UNITS, MASK, durations=torch.ones(3, 6, dtype=torch.long)), "durations shape"),
    "durations-float": (lambda m: m(UNITS, MASK, durations=torch.ones(3, 7)), "durations must be an integer"),
    "durations-zero": (lambda m: m(UNITS[0], durations=torch.zeros(7, dtype=torch.long)), "durations must be ≥ 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(make_vocoder())


@pytest.mark.parametrize(
    "speaker_id, message",
    [(3, r"speaker_id must be in \[0, 3\)"), (-1, r"speaker_id must be in \[0, 3\)"), (None, "pass a speaker_id")],
)
def test_bad_speaker_raises(speaker_id, message):
    with pytest.raises(ValueError, match=message):
        make_vocoder(**MULTI_SPEAKER).synthesize([1, 2], speaker_id=speaker_id)


# ----------------------------------------------------------------------------------------------- fairseq converter

FAIRSEQ_CONFIG = {
    "resblock": "1",
    "upsample_rates": [2, 3],
    "upsample_kernel_sizes": [4, 7],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "num_embeddings": 20,
    "embedding_dim": 16,
    "model_in_dim": 16,
    "segment_size": 8960,
    "code_hop_size": 6,
    "f0": False,
    "dur_prediction_weight": 1.0,
    "dur_predictor_params": {
        "encoder_embed_dim": 16,
        "var_pred_hidden_dim": 16,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
}
FAIRSEQ_MULTI_SPEAKER = {"multispkr": True, "num_speakers": 3, "model_in_dim": 32}


def fairseq_generator_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fairseq `CodeGenerator` state dict: exact fairseq key names and shapes, weight norm as `_g`/`_v`."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    def weight_normed(name, weight_shape, bias_size):
        # torch's weight_norm(dim=0): one g per row of the weight (out channels; in channels for ConvTranspose1d)
        return {
            f"{name}.weight_g": 0.5 + torch.rand(weight_shape[0], 1, 1, generator=generator),
            f"{name}.weight_v": randn(*weight_shape),
            f"{name}.bias": randn(bias_size, scale=0.1),
        }

    embed = cfg["embedding_dim"]
    hidden = cfg["dur_predictor_params"]["var_pred_hidden_dim"]
    kernel = cfg["dur_predictor_params"]["var_pred_kernel_size"]
    state_dict = {"dict.weight": randn(cfg["num_embeddings"], embed)}
    if cfg.get("multispkr"):
        state_dict["spkr.weight"] = randn(cfg["num_speakers"], embed)
    state_dict.update(
        {
            "dur_predictor.conv1.0.weight": randn(hidden, embed, kernel, scale=(embed * kernel) ** -0.5),
            "dur_predictor.conv1.0.bias": randn(hidden, scale=0.1),
            "dur_predictor.ln1.weight": 1 + randn(hidden, scale=0.1),
            "dur_predictor.ln1.bias": randn(hidden, scale=0.1),
            "dur_predictor.conv2.0.weight": randn(hidden, hidden, kernel, scale=(hidden * kernel) ** -0.5),
            "dur_predictor.conv2.0.bias": randn(hidden, scale=0.1),
            "dur_predictor.ln2.weight": 1 + randn(hidden, scale=0.1),
            "dur_predictor.ln2.bias": randn(hidden, scale=0.1),
            "dur_predictor.proj.weight": randn(1, hidden, scale=0.5),
            "dur_predictor.proj.bias": torch.ones(1),
        }
    )
    channels = cfg["upsample_initial_channel"]
    state_dict.update(weight_normed("conv_pre", (channels, cfg["model_in_dim"], 7), channels))
    resblock = 0
    for i, kernel_size in enumerate(cfg["upsample_kernel_sizes"]):
        state_dict.update(weight_normed(f"ups.{i}", (channels, channels // 2, kernel_size), channels // 2))
        channels //= 2
        for kernel_size, dilations in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]):
            for j in range(len(dilations)):
                for convs in ("convs1", "convs2"):
                    name = f"resblocks.{resblock}.{convs}.{j}"
                    state_dict.update(weight_normed(name, (channels, channels, kernel_size), channels))
            resblock += 1
    state_dict.update(weight_normed("conv_post", (1, channels, 7), 1))
    return state_dict


def reference_code_generator(sd, cfg, code, durations=None, speaker=None):
    """fairseq's CodeGenerator forward (batch of one) on the raw fairseq tensors, with torch.nn.functional only."""

    def weight(name):
        v, g = sd[f"{name}.weight_v"], sd[f"{name}.weight_g"]
        return g * v / v.norm(dim=(1, 2), keepdim=True)

    def conv(x, name, dilation=1):
        kernel = sd[f"{name}.weight_v"].shape[-1]
        padding = (kernel * dilation - dilation) // 2
        return F.conv1d(x, weight(name), sd[f"{name}.bias"], padding=padding, dilation=dilation)

    x = F.embedding(code[None], sd["dict.weight"]).transpose(1, 2)  # 1 x C x T
    if durations is None:  # fairseq's VariancePredictor (eval: no dropout); conv1 pads (k - 1) // 2, conv2 pads 1
        hidden = cfg["dur_predictor_params"]["var_pred_hidden_dim"]
        padding = (cfg["dur_predictor_params"]["var_pred_kernel_size"] - 1) // 2

        def p(name):
            return sd[f"dur_predictor.{name}"]

        h = F.relu(F.conv1d(x, p("conv1.0.weight"), p("conv1.0.bias"), padding=padding)).transpose(1, 2)
        h = F.layer_norm(h, (hidden,), p("ln1.weight"), p("ln1.bias")).transpose(1, 2)
        h = F.relu(F.conv1d(h, p("conv2.0.weight"), p("conv2.0.bias"), padding=1)).transpose(1, 2)
        h = F.layer_norm(h, (hidden,), p("ln2.weight"), p("ln2.bias"))
        log_durations = F.linear(h, p("proj.weight"), p("proj.bias")).squeeze(2)
        durations = torch.clamp(torch.round(torch.exp(log_durations) - 1).long(), min=1)
    x = torch.repeat_interleave(x, durations.view(-1), dim=2)
    if speaker is not None:
        spkr = F.embedding(torch.tensor([speaker]), sd["spkr.weight"])[:, :, None].repeat(1, 1, x.shape[-1])
        x = torch.cat([x, spkr], dim=1)

    x = conv(x, "conv_pre")
    num_kernels = len(cfg["resblock_kernel_sizes"])
    for i, (rate, kernel) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, weight(f"ups.{i}"), sd[f"ups.{i}.bias"], stride=rate, padding=(kernel - rate) // 2)
        xs = None
        for j, dilations in enumerate(cfg["resblock_dilation_sizes"]):
            block = f"resblocks.{i * num_kernels + j}"
            y = x
            for k, dilation in enumerate(dilations):
                xt = F.leaky_relu(y, 0.1)
                xt = conv(xt, f"{block}.convs1.{k}", dilation)
                xt = F.leaky_relu(xt, 0.1)
                xt = conv(xt, f"{block}.convs2.{k}")
                y = xt + y
            xs = y if xs is None else xs + y
        x = xs / num_kernels
    x = F.leaky_relu(x)
    x = conv(x, "conv_post")
    return torch.tanh(x).view(-1), durations.view(-1)


def write_fairseq_vocoder(directory: pathlib.Path, cfg: dict, state_dict: dict) -> tuple[pathlib.Path, pathlib.Path]:
    checkpoint_path, config_path = directory / "g_00500000", directory / "vocoder_config.json"
    torch.save({"generator": state_dict}, checkpoint_path)
    config_path.write_text(json.dumps(cfg))
    return checkpoint_path, config_path


@pytest.mark.parametrize("speaker", [None, 2], ids=["single-speaker", "multi-speaker"])
def test_fairseq_conversion_matches_reference(tmp_path, speaker):
    cfg = FAIRSEQ_CONFIG if speaker is None else {**FAIRSEQ_CONFIG, **FAIRSEQ_MULTI_SPEAKER}
    state_dict = fairseq_generator_state_dict(cfg)
    model = convert_fairseq_vocoder(*write_fairseq_vocoder(tmp_path, cfg, state_dict))
    assert not model.training
    assert (model.config.num_speakers, model.config.spkr_embed_dim) == ((0, 0) if speaker is None else (3, 16))

    code = torch.tensor([3, 7, 1, 19, 0, 5, 2])
    durations = torch.tensor([1, 3, 2, 1, 4, 1, 2])
    with torch.no_grad():
        reference, _ = reference_code_generator(state_dict, cfg, code, durations, speaker)
        ours = model(code, durations=durations, speaker_id=speaker)
        reference_predicted, reference_durations = reference_code_generator(state_dict, cfg, code, speaker=speaker)
        ours_predicted = model(code, speaker_id=speaker)
    assert reference.std() > 1e-2
    assert ours.waveform_lengths.item() == durations.sum().item() * HOP
    torch.testing.assert_close(ours.waveform[0], reference, atol=1e-4, rtol=0)

    assert reference_durations.max() > 1
    assert torch.equal(model.predict_durations(code)[0], reference_durations)
    torch.testing.assert_close(ours_predicted.waveform[0], reference_predicted, atol=1e-4, rtol=0)


def test_released_config_gives_default_config():
    released = {
        **FAIRSEQ_CONFIG,
        "upsample_rates": [5, 4, 4, 2, 2],
        "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": 512,
        "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "num_embeddings": 1000,
        "embedding_dim": 128,
        "model_in_dim": 128,
        "dur_predictor_params": {
            "encoder_embed_dim": 128,
            "var_pred_hidden_dim": 128,
            "var_pred_kernel_size": 3,
            "var_pred_dropout": 0.5,
        },
    }
    assert vocoder_config_from_fairseq(released).to_dict() == EchoXVocoderConfig().to_dict()


class _Payload:
    """Pickles as a call that would create a file when unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_conversion_refuses_pickled_code(tmp_path):
    marker = tmp_path / "executed"
    checkpoint_path, config_path = write_fairseq_vocoder(tmp_path, FAIRSEQ_CONFIG, {"dict.weight": torch.zeros(1)})
    torch.save({"generator": _Payload(marker)}, checkpoint_path)
    with pytest.raises(ValueError, match="not a plain tensor pickle.*never executed"):
        convert_fairseq_vocoder(checkpoint_path, config_path)
    assert not marker.exists()


def test_conversion_missing_files(tmp_path):
    checkpoint_path, config_path = write_fairseq_vocoder(tmp_path, FAIRSEQ_CONFIG, {})
    with pytest.raises(OSError, match="nowhere/g_00500000"):
        convert_fairseq_vocoder(tmp_path / "nowhere" / "g_00500000", config_path)
    with pytest.raises(OSError, match="missing.json"):
        convert_fairseq_vocoder(checkpoint_path, tmp_path / "missing.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resblock": "2"}, "resblock type '1'"),
        (
            {"dur_predictor_params": {**FAIRSEQ_CONFIG["dur_predictor_params"], "var_pred_hidden_dim": 8}},
            "var_pred_hidden_dim",
        ),
        ({"model_in_dim": 80}, "model_in_dim=80"),
        ({"f0": True}, "F0"),
        ({"dur_predictor_params": None}, "no duration predictor"),
    ],
    ids=["resblock-2", "predictor-hidden-dim", "model-in-dim", "f0", "no-dur-predictor"],
)
def test_unsupported_fairseq_config(change, message):
    with pytest.raises(ValueError, match=message):
        vocoder_config_from_fairseq({**FAIRSEQ_CONFIG, **change})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("conv_post.bias"), r"missing keys \['hifi_gan.conv_post.bias'\]"),
        (
            lambda sd: sd.update({"f0_quant_embed.weight": torch.zeros(2, 16)}),
            r"unexpected keys \['f0_quant_embed.weight'\]",
        ),
        (lambda sd: sd.update({"dict.weight": torch.zeros(21, 16)}), r"unit_embedding.weight: checkpoint \(21, 16\)"),
        (lambda sd: sd.pop("conv_pre.weight_v"), "conv_pre.weight_g but no conv_pre.weight_v"),
    ],
    ids=["missing", "unexpected", "shape", "half-weight-norm"],
)
def test_conversion_checks_keys(tmp_path, edit, message):
    state_dict = fairseq_generator_state_dict(FAIRSEQ_CONFIG)
    edit(state_dict)
    with pytest.raises(ValueError, match=message):
        convert_fairseq_vocoder(*write_fairseq_vocoder(tmp_path, FAIRSEQ_CONFIG, state_dict))


# ------------------------------------------------------------------------------------------- iSTFT generator option

ISTFT = {
    "generator_type": "istft",
    "num_units": 20,
    "unit_embed_dim": 16,
    "istft_dim": 32,
    "istft_intermediate_dim": 48,
    "istft_layers": 2,
    "istft_upsample": 2,
    "istft_n_fft": 16,
    "istft_hop_length": 4,
}
ISTFT_HOP = 8


def make_istft_vocoder(seed: int = 0, **overrides) -> EchoXCodeHifiGan:
    """Tiny iSTFT vocoder with weights scaled so that waveforms are O(0.1) and predicted durations vary."""
    torch.manual_seed(seed)
    model = EchoXCodeHifiGan(EchoXVocoderConfig(**{**ISTFT, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 and "embedding" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
        model.istft_generator.head.bias[: ISTFT["istft_n_fft"] // 2 + 1].fill_(-3.0)  # log-magnitude ~ -3
        model.dur_predictor.proj.weight.normal_(0.0, 0.2)
        model.dur_predictor.proj.bias.fill_(0.8)
    return model


def test_istft_config_fields_and_validation():
    default = EchoXVocoderConfig()
    assert default.generator_type == "hifigan" and default.hop_length == 320
    istft = EchoXVocoderConfig(generator_type="istft")
    assert istft.hop_length == istft.istft_upsample * istft.istft_hop_length == 320
    at_50hz = EchoXVocoderConfig(generator_type="istft", istft_upsample=1, istft_hop_length=320, istft_n_fft=1280)
    assert at_50hz.hop_length == 320
    model = EchoXCodeHifiGan(EchoXVocoderConfig(generator_type="istft"))
    assert not hasattr(model, "hifi_gan") and 2e6 < sum(p.numel() for p in model.parameters()) < 4e6
    with pytest.raises(Exception, match="generator_type"):  # the strict dataclass' validation error
        EchoXVocoderConfig(generator_type="vocos")
    with pytest.raises(ValueError, match="istft_n_fft"):
        EchoXVocoderConfig(generator_type="istft", istft_n_fft=200, istft_hop_length=160)


def test_istft_synthesize_is_forward_trimmed():
    model = make_istft_vocoder()
    waveform = model.synthesize([3, 7, 1, 19])
    reference = model(torch.tensor([3, 7, 1, 19]))
    assert waveform.dim() == 1 and torch.equal(waveform, reference.waveform[0, : reference.waveform_lengths[0]])


def test_istft_generator_is_a_plain_istft():
    """Alone (no padding) the generator is exactly the documented pipeline ending in `torch.istft`."""
    model = make_istft_vocoder()
    generator = model.istft_generator
    frames = torch.randn(1, 16, 5)
    with torch.no_grad():
        waveform, lengths = generator(frames, torch.tensor([5]))
        hidden = generator.conv_pre(torch.repeat_interleave(frames, 2, dim=2))
        hidden = generator.norm_pre(hidden.transpose(1, 2)).transpose(1, 2)
        for block in generator.blocks:
            residual = block.dwconv(hidden).transpose(1, 2)
            residual = block.pwconv2(F.gelu(block.pwconv1(block.norm(residual))))
            hidden = hidden + (block.gamma * residual).transpose(1, 2)
        log_mag, phase = generator.head(generator.norm_post(hidden.transpose(1, 2))).transpose(1, 2).chunk(2, dim=1)
        spec = torch.polar(torch.exp(log_mag.clamp(max=math.log(100))), phase)
        expected = torch.istft(spec, 16, 4, 16, torch.hann_window(16), center=True, length=40).clamp(-1, 1)
    assert lengths.tolist() == [40]
    torch.testing.assert_close(waveform, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides", [{}, MULTI_SPEAKER, {"istft_upsample": 1}], ids=["tiny", "multi-speaker", "50hz"])
def test_istft_batched_equals_unbatched(overrides):
    model = make_istft_vocoder(**overrides)
    speaker_ids = torch.tensor([2, 0, 1]) if overrides.get("num_speakers") else None
    with torch.no_grad():
        batched = model(UNITS, attention_mask=MASK, speaker_id=speaker_ids)
        durations = model.predict_durations(UNITS, attention_mask=MASK)
    assert durations.max() > 1, "the test should exercise durations > 1"
    for row in range(len(UNITS)):
        length = int(MASK[row].sum())
        speaker = None if speaker_ids is None else int(speaker_ids[row])
        with torch.no_grad():
            alone = model(UNITS[row, :length], speaker_id=speaker)
        samples = int(alone.waveform_lengths[0])
        assert batched.waveform_lengths[row] == samples == int(durations[row].sum()) * model.config.hop_length
        torch.testing.assert_close(batched.waveform[row, :samples], alone.waveform[0], atol=1e-5, rtol=0)
        assert torch.all(batched.waveform[row, samples:] == 0)


def test_istft_save_pretrained_round_trip_and_weight_norm(tmp_path):
    model = make_istft_vocoder(**MULTI_SPEAKER)
    with torch.no_grad():
        reference = model(UNITS, MASK, speaker_id=1).waveform
    model.apply_weight_norm()  # no-ops for the iSTFT generator
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    model.remove_weight_norm()
    model.save_pretrained(tmp_path)
    loaded = EchoXCodeHifiGan.from_pretrained(tmp_path).eval()
    assert loaded.config.generator_type == "istft" and loaded.config.to_dict().keys() == model.config.to_dict().keys()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[key], loaded_state[key]) for key in original_state)
    with torch.no_grad():
        assert torch.equal(reference, loaded(UNITS, MASK, speaker_id=1).waveform)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_istft_bad_input_raises(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(make_istft_vocoder())
