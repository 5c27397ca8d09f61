"""
[`EchoXUnitExtractor`]: speech encoder features → k-means → frame-level unit ids (50 Hz) → run-length dedup. It reads a
chosen layer of any transformers speech encoder (`WhisperEncoder` / `WhisperModel`, or waveform encoders such as
`HubertModel` / `Wav2Vec2Model`) and assigns each frame to its nearest centroid of an [`EchoXUnitKMeans`] (kmeans.py).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .kmeans import SAMPLING_RATE, EchoXUnitKMeans, deduplicate_units, fit_kmeans


def _check_clip(audio: Any, index: int | None = None) -> np.ndarray:
    where = "audio" if index is None else f"audio[{index}]"
    if isinstance(audio, torch.Tensor):
        if not audio.is_floating_point():
            raise ValueError(f"{where} must be floating point in [-1, 1], got dtype {audio.dtype}; convert integer "
                             "PCM first (e.g. int16 / 32768) or use modeling_echox.model.audio_io.load_audio.")
        array = audio.detach().to("cpu", torch.float32).numpy()
    elif isinstance(audio, np.ndarray):
        if not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"{where} must be floating point in [-1, 1], got dtype {audio.dtype}; convert integer "
                             "PCM first (e.g. int16 / 32768) or use modeling_echox.model.audio_io.load_audio.")
        array = audio.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{where} must be a 1-D numpy array or torch tensor of 16 kHz samples, got "
                         f"{type(audio).__name__}.")
    if array.ndim != 1:
        raise ValueError(f"{where} must be 1-D mono samples, got shape {array.shape}; average or pick a channel first.")
    if array.size == 0:
        raise ValueError(f"{where} is empty.")
    if not np.isfinite(array).all():
        raise ValueError(f"{where} contains NaN or infinite samples.")
    return array


def _num_layers(config) -> int:
    for name in ("encoder_layers", "num_hidden_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot tell how many layers a {type(config).__name__} encoder has.")


class EchoXUnitExtractor:
    """
    Speech → acoustic units with a transformers speech encoder and k-means centroids.

    Args:
        encoder: a transformers speech model. Mel-input encoders (`WhisperEncoder`, or a `WhisperModel` /
            `WhisperForConditionalGeneration`, whose encoder is used) are run window by window (30 s for Whisper)
            and their output is trimmed to the clip's real frame count; waveform encoders (`HubertModel`,
            `Wav2Vec2Model`, … taking `input_values`) see the whole clip.
        kmeans: the [`EchoXUnitKMeans`] (may be given later, e.g. by [`fit_kmeans`]).
        layer: hidden-state index (`output_hidden_states`): 0 = the input of the first Transformer layer, `i` = the
            output of layer `i`; negative values count from the end (-1 = last layer, which for Whisper is the
            final-LayerNorm output). Defaults to the k-means' recorded layer, else -1.
        feature_extractor: turns 16 kHz audio into the encoder's input; default `WhisperFeatureExtractor` sized to
            the encoder for Whisper, `Wav2Vec2FeatureExtractor(do_normalize=feat_extract_norm == "layer")` otherwise
            (pass your checkpoint's own feature extractor when it differs).
    """

    def __init__(self, encoder, kmeans: EchoXUnitKMeans | None = None, layer: int | None = None,
                 feature_extractor=None):
        if not isinstance(encoder, torch.nn.Module) or not hasattr(encoder, "config"):
            raise ValueError(f"encoder must be a transformers model, got {type(encoder).__name__}.")
        if getattr(encoder.config, "model_type", None) == "whisper" and hasattr(encoder, "get_encoder"):
            encoder = encoder.get_encoder()
        self.encoder = encoder.eval()
        parameters = inspect.signature(encoder.forward).parameters
        if "input_features" in parameters:
            self.input_kind = "mel"
        elif "input_values" in parameters:
            self.input_kind = "waveform"
        else:
            raise ValueError(f"{type(encoder).__name__} takes neither `input_features` nor `input_values`.")
        self.num_layers = _num_layers(encoder.config)
        if layer is None:
            layer = kmeans.layer if kmeans is not None and kmeans.layer is not None else -1
        self.layer = self._check_layer(layer)
        self.feature_extractor = feature_extractor or self._default_feature_extractor()
        self.kmeans = None
        if kmeans is not None:
            self.set_kmeans(kmeans)

    # -------------------------------------------------------------- configuration
    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer must be an integer, got {layer!r}.")
        n = self.num_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(
                f"layer {layer} is out of range for a {n}-layer encoder: use 0 … {n} (or -{n + 1} … -1)."
            )
        return int(layer) % (n + 1)

    def _default_feature_extractor(self):
        config = self.encoder.config
        if self.input_kind == "mel":
            if config.model_type != "whisper":
                raise ValueError(f"Pass the feature_extractor of this {config.model_type} encoder.")
            from transformers import WhisperFeatureExtractor

            return WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        from transformers import Wav2Vec2FeatureExtractor

        return Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0,
            do_normalize=getattr(config, "feat_extract_norm", "group") == "layer", return_attention_mask=False,
        )

    @property
    def hidden_size(self) -> int:
        config = self.encoder.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @property
    def encoder_info(self) -> dict:
        config = self.encoder.config
        return {
            "model_type": config.model_type,
            "class": type(self.encoder).__name__,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "name_or_path": getattr(config, "_name_or_path", "") or "",
            "frame_rate": self.frame_rate,
        }

    @property
    def frame_rate(self) -> float:
        """Encoder frames per second (50 for Whisper, HuBERT and wav2vec 2.0)."""
        return SAMPLING_RATE / self._samples_per_frame()

    def _samples_per_frame(self) -> int:
        config = self.encoder.config
        if self.input_kind == "mel":
            return int(self.feature_extractor.hop_length * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0])
        return int(np.prod(config.conv_stride))

    def set_kmeans(self, kmeans: EchoXUnitKMeans) -> None:
        if not isinstance(kmeans, EchoXUnitKMeans):
            raise ValueError(f"kmeans must be an EchoXUnitKMeans, got {type(kmeans).__name__}.")
        if kmeans.dim != self.hidden_size:
            raise ValueError(f"The k-means centroids have dimension {kmeans.dim} but this encoder's features have "
                             f"{self.hidden_size}: they were fitted on another encoder.")
        if kmeans.layer is not None and kmeans.layer % (self.num_layers + 1) != self.layer:
            raise ValueError(f"The k-means was fitted on layer {kmeans.layer} but this extractor reads layer "
                             f"{self.layer}.")
        self.kmeans = kmeans

    # -------------------------------------------------------------- features
    def _run(self, **inputs) -> torch.Tensor:
        outputs = self.encoder(**inputs, output_hidden_states=True)
        hidden_states = outputs.hidden_states
        if hidden_states is None or len(hidden_states) != self.num_layers + 1:
            count = 0 if hidden_states is None else len(hidden_states)
            raise ValueError(f"{type(self.encoder).__name__} returned {count} hidden states, expected "
                             f"{self.num_layers + 1}.")
        return hidden_states[self.layer][0]

    @torch.inference_mode()
    def extract_features(self, audio: Any, sampling_rate: int = SAMPLING_RATE) -> torch.Tensor | list[torch.Tensor]:
        """`[frames, hidden]` float32 features of the chosen layer for one clip (a list of clips gives a list)."""
        if isinstance(audio, (list, tuple)):
            if not audio:
                raise ValueError("audio: got an empty list of clips.")
            return [self.extract_features(self._clip(clip, i), sampling_rate) for i, clip in enumerate(audio)]
        expected = getattr(self.feature_extractor, "sampling_rate", SAMPLING_RATE)
        if sampling_rate != expected:
            raise ValueError(f"sampling_rate must be {expected} Hz, got {sampling_rate}; resample first "
                             "(modeling_echox.model.audio_io.load_audio does it).")
        clip = _check_clip(audio)
        device = next(self.encoder.parameters()).device
        dtype = next(self.encoder.parameters()).dtype
        if self.input_kind == "mel":
            return self._whisper_features(clip, device, dtype)
        return self._waveform_features(clip, device, dtype)

    @staticmethod
    def _clip(clip, index):
        return _check_clip(clip, index)

    def _whisper_features(self, clip: np.ndarray, device, dtype) -> torch.Tensor:
        samples_per_frame = self._samples_per_frame()
        window_frames = int(self.encoder.config.max_source_positions)
        window_samples = window_frames * samples_per_frame
        parts = []
        for start in range(0, clip.size, window_samples):
            chunk = clip[start : start + window_samples]
            mel = self.feature_extractor(
                chunk, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=window_samples,
                return_tensors="pt",
            ).input_features
            hidden = self._run(input_features=mel.to(device, dtype))
            parts.append(hidden[: min(window_frames, math.ceil(chunk.size / samples_per_frame))])
        return torch.cat(parts).float().cpu()

    def _waveform_features(self, clip: np.ndarray, device, dtype) -> torch.Tensor:
        lengths = getattr(self.encoder, "_get_feat_extract_output_lengths", None)
        if lengths is not None and int(lengths(torch.tensor(clip.size))) < 1:
            raise ValueError(f"audio is too short ({clip.size} samples) for this encoder's convolutional front end.")
        values = self.feature_extractor(clip, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_values
        return self._run(input_values=values.to(device, dtype)).float().cpu()

    # -------------------------------------------------------------- units
    def _require_kmeans(self) -> EchoXUnitKMeans:
        if self.kmeans is None:
            raise ValueError("This EchoXUnitExtractor has no k-means yet: fit one with `fit_kmeans` or load one.")
        return self.kmeans

    def frame_units(self, audio: Any, sampling_rate: int = SAMPLING_RATE) -> torch.LongTensor | list[torch.LongTensor]:
        """Frame-level unit ids (one per encoder frame, 50 Hz) of one clip, or a list for a list of clips."""
        kmeans = self._require_kmeans()
        features = self.extract_features(audio, sampling_rate)
        if isinstance(features, list):
            return [kmeans.assign(f) for f in features]
        return kmeans.assign(features)

    def __call__(self, audio: Any, sampling_rate: int = SAMPLING_RATE):
        """Deduplicated `(units, durations)` (int64 tensors; durations in frames) of one clip, or a list of pairs."""
        units = self.frame_units(audio, sampling_rate)
        if isinstance(units, list):
            return [deduplicate_units(u) for u in units]
        return deduplicate_units(units)

    def fit_kmeans(self, audio: Sequence[Any], k: int, **kwargs) -> EchoXUnitKMeans:
        """Extract features from `audio` (a list of clips), fit k-means ([`fit_kmeans`]) and adopt it."""
        features = self.extract_features(list(audio))
        kmeans = fit_kmeans(features, k, layer=self.layer, encoder_info=self.encoder_info, **kwargs)
        self.set_kmeans(kmeans)
        return kmeans

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Save the k-means (`unit_kmeans.safetensors` + `unit_kmeans.json`); the encoder is not saved."""
        kmeans = self._require_kmeans()
        return EchoXUnitKMeans(kmeans.centroids, layer=self.layer, encoder_info={**kmeans.encoder_info,
                                                                                 **self.encoder_info}
                               ).save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, encoder, feature_extractor=None) -> "EchoXUnitExtractor":
        """Load the k-means from `directory` and pair it with `encoder` (checked against the recorded encoder)."""
        kmeans = EchoXUnitKMeans.from_pretrained(directory)
        extractor = cls(encoder, kmeans=None, layer=-1, feature_extractor=feature_extractor)
        recorded = kmeans.encoder_info
        for key in ("model_type", "hidden_size", "num_layers"):
            if key in recorded and recorded[key] != extractor.encoder_info[key]:
                raise ValueError(f"The k-means in {os.fspath(directory)} was fitted on an encoder with {key}="
                                 f"{recorded[key]!r}, but this encoder has {key}={extractor.encoder_info[key]!r}.")
        if kmeans.layer is not None:
            extractor.layer = extractor._check_layer(kmeans.layer)
        extractor.set_kmeans(kmeans)
        return extractor
