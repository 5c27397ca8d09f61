"""Converts fairseq's CodeHiFiGAN unit vocoder (`g_00500000` + `vocoder_config.json`, shipped with EchoX) to
[`EchoXCodeHifiGan`].

    python -m modeling_echox.convert.fairseq_vocoder --checkpoint_path g_00500000 \
        --config_path vocoder_config.json --output_dir echox-vocoder
"""

import argparse
import json
import os
import pickle
import re

import torch

from ..model.configuration_echox import EchoXVocoderConfig
from ..model.vocoder import EchoXCodeHifiGan

# fairseq `CodeGenerator` name → `EchoXCodeHifiGan` name, applied after folding the weight norm.
_KEY_RENAMES = [
    (re.compile(r"^dict\."), "unit_embedding."),
    (re.compile(r"^spkr\."), "speaker_embedding."),
    (re.compile(r"^dur_predictor\.conv([12])\.0\."), r"dur_predictor.conv\1."),
    (re.compile(r"^conv_pre\."), "hifi_gan.conv_pre."),
    (re.compile(r"^ups\."), "hifi_gan.upsampler."),
    (re.compile(r"^resblocks\."), "hifi_gan.resblocks."),
    (re.compile(r"^conv_post\."), "hifi_gan.conv_post."),
]


def _require(fairseq_config: dict, key: str, where: str = "vocoder config"):
    if key not in fairseq_config:
        raise ValueError(f"The fairseq {where} has no {key!r} entry.")
    return fairseq_config[key]


def vocoder_config_from_fairseq(fairseq_config: dict) -> EchoXVocoderConfig:
    """[`EchoXVocoderConfig`] of a fairseq CodeHiFiGAN `vocoder_config.json` (resblock "1", duration predictor)."""
    resblock = str(fairseq_config.get("resblock", "1"))
    if resblock != "1":
        raise ValueError(f"Only HiFi-GAN resblock type '1' is supported; the fairseq config has {resblock!r}.")
    if fairseq_config.get("f0"):
        raise ValueError("F0-conditioned CodeHiFiGAN vocoders (f0=true) are not supported.")
    if fairseq_config.get("embedder_params"):
        raise ValueError("CodeHiFiGAN vocoders with a speaker encoder (embedder_params) are not supported.")

    dur_params = fairseq_config.get("dur_predictor_params")
    if not dur_params:
        raise ValueError("The fairseq vocoder has no duration predictor (dur_predictor_params); EchoX needs one.")
    embed_dim = _require(fairseq_config, "embedding_dim")
    dur_embed_dim = _require(dur_params, "encoder_embed_dim", "dur_predictor_params")
    dur_hidden_dim = _require(dur_params, "var_pred_hidden_dim", "dur_predictor_params")
    if dur_embed_dim != embed_dim:
        raise ValueError(
            f"dur_predictor_params.encoder_embed_dim={dur_embed_dim} differs from embedding_dim={embed_dim}; the "
            "duration predictor reads the unit embeddings."
        )
    if dur_hidden_dim != dur_embed_dim:
        raise ValueError(
            f"dur_predictor_params.var_pred_hidden_dim={dur_hidden_dim} differs from encoder_embed_dim="
            f"{dur_embed_dim}; EchoX's duration predictor (SeamlessM4TVariancePredictor) ties the two."
        )

    # fairseq's speaker table has `embedding_dim` columns, whatever else the config says
    multispeaker = bool(fairseq_config.get("multispkr"))
    num_speakers = fairseq_config.get("num_speakers", 200) if multispeaker else 0
    spkr_embed_dim = embed_dim if multispeaker else 0
    model_in_dim = fairseq_config.get("model_in_dim", 80)
    if model_in_dim != embed_dim + spkr_embed_dim:
        raise ValueError(
            f"model_in_dim={model_in_dim} is not embedding_dim ({embed_dim}) + speaker embedding ({spkr_embed_dim}); "
            "extra conditioning features are not supported."
        )

    return EchoXVocoderConfig(
        num_units=_require(fairseq_config, "num_embeddings"),
        unit_embed_dim=embed_dim,
        num_speakers=num_speakers,
        spkr_embed_dim=spkr_embed_dim,
        upsample_initial_channel=_require(fairseq_config, "upsample_initial_channel"),
        upsample_rates=list(_require(fairseq_config, "upsample_rates")),
        upsample_kernel_sizes=list(_require(fairseq_config, "upsample_kernel_sizes")),
        resblock_kernel_sizes=list(_require(fairseq_config, "resblock_kernel_sizes")),
        resblock_dilation_sizes=[list(d) for d in _require(fairseq_config, "resblock_dilation_sizes")],
        leaky_relu_slope=0.1,  # fairseq's LRELU_SLOPE
        variance_predictor_kernel_size=_require(dur_params, "var_pred_kernel_size", "dur_predictor_params"),
        var_pred_dropout=_require(dur_params, "var_pred_dropout", "dur_predictor_params"),
        sampling_rate=fairseq_config.get("sampling_rate", 16000),
    )


def fairseq_state_dict_to_echox(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Renames a fairseq `CodeGenerator` state dict to [`EchoXCodeHifiGan`] names and folds each weight norm pair
    (`weight_g`, `weight_v`, torch's default `dim=0`) into `weight = g * v / ||v||`. Unknown keys are kept as they are.
    """
    converted = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            prefix = key[: -len("_g")]
            if prefix + "_v" not in state_dict:
                raise ValueError(f"The fairseq state dict has {key} but no {prefix}_v.")
            key, tensor = prefix, torch._weight_norm(state_dict[prefix + "_v"], tensor, 0)
        converted[key] = tensor
    orphans = [key for key in state_dict if key.endswith(".weight_v") and key[: -len("_v")] + "_g" not in state_dict]
    if orphans:
        raise ValueError(f"The fairseq state dict has weight_v without weight_g: {orphans}.")

    renamed = {}
    for key, tensor in converted.items():
        for pattern, replacement in _KEY_RENAMES:
            key, found = pattern.subn(replacement, key)
            if found:
                break
        renamed[key] = tensor
    return renamed


def _load_generator_state_dict(checkpoint_path: str) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{checkpoint_path} is not a plain tensor pickle: it holds other Python objects or is no torch checkpoint "
            "at all. It is refused, because pickled code is never executed (torch.load with weights_only=True)."
        ) from error
    except (RuntimeError, EOFError) as error:
        raise OSError(f"Could not read {checkpoint_path} as a torch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("generator"), dict):
        raise ValueError(f"{checkpoint_path} has no 'generator' state dict; is it a fairseq CodeHiFiGAN checkpoint?")
    return checkpoint["generator"]


def convert_fairseq_vocoder(checkpoint_path: str | os.PathLike, config_path: str | os.PathLike) -> EchoXCodeHifiGan:
    """
    Builds an [`EchoXCodeHifiGan`] (in eval mode) from a fairseq CodeHiFiGAN checkpoint (a torch pickle with a
    `"generator"` state dict, loaded with `weights_only=True`) and its `vocoder_config.json`.
    """
    for path in (checkpoint_path, config_path):
        if not os.path.isfile(path):
            raise OSError(f"No such file: {path}")
    try:
        with open(config_path, encoding="utf-8") as file:
            fairseq_config = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error

    config = vocoder_config_from_fairseq(fairseq_config)
    state_dict = fairseq_state_dict_to_echox(_load_generator_state_dict(checkpoint_path))
    model = EchoXCodeHifiGan(config)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The checkpoint {checkpoint_path} does not fit the config {config_path}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {mismatched}."
        )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_path", required=True, help="fairseq checkpoint, e.g. g_00500000")
    parser.add_argument("--config_path", required=True, help="fairseq vocoder_config.json")
    parser.add_argument("--output_dir", required=True, help="where to save_pretrained the converted vocoder")
    args = parser.parse_args()
    convert_fairseq_vocoder(args.checkpoint_path, args.config_path).save_pretrained(args.output_dir)


__all__ = ["convert_fairseq_vocoder", "fairseq_state_dict_to_echox", "vocoder_config_from_fairseq"]


if __name__ == "__main__":
    main()
