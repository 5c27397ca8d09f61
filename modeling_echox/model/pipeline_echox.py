"""`pipeline("speech-to-speech")`: a spoken question in, the text and spoken answer out."""

import os
from collections.abc import Mapping

import numpy as np
import torch
from transformers import GenerationConfig, Pipeline
from transformers.pipelines.audio_utils import ffmpeg_read

from .conversation import is_conversation
from .streaming import EchoXAudioStreamer

# The parameters a call may pass directly to `generate()`: the same set `Pipeline.__init__` sets aside at construction.
_GENERATION_PARAMETERS = frozenset(
    {key for key in vars(GenerationConfig()) if not key.startswith("_")} | {"generation_config"}
)
# The `generate()` arguments the pipeline sets itself: it always decodes the text and speaks the answer.
_OWN_GENERATE_ARGUMENTS = ("tokenizer", "processor", "return_audio", "conversation")
# Dict inputs, as in the `automatic-speech-recognition` pipeline: samples under "raw" (or "array", the 🤗 Datasets
# key, next to which a "path" is ignored) and their "sampling_rate".
_DICT_KEYS = frozenset({"raw", "array", "sampling_rate", "path"})


class _Conversation:
    """One conversation given to the pipeline (kept whole, where a plain list would be a batch of clips)."""

    def __init__(self, messages):
        self.messages = list(messages)


class SpeechToSpeechPipeline(Pipeline):
    """
    Answers spoken questions with an EchoX checkpoint, taking its inputs the way the `automatic-speech-recognition`
    pipeline does.

    Inputs (or a list of them, answered in order, `batch_size` at a time):
        - `str` / `os.PathLike`: a local audio file, read by [`EchoXProcessor`] (its own sample rate, any channels);
        - `bytes`: the content of an audio file, decoded by ffmpeg (`ffmpeg_read`) at the feature extractor's rate;
        - `np.ndarray` / `torch.Tensor`: samples at the feature extractor's rate (16 kHz), unless `sampling_rate=`
          says otherwise;
        - `dict`: `{"raw": samples, "sampling_rate": int}` or `{"array": samples, "sampling_rate": int}` (a 🤗 Datasets
          audio row), resampled to 16 kHz;
        - a conversation: a list of `{"role", "content"}` messages (see [`EchoXProcessor`]), whose audio parts take any
          of the forms above; the answer is the next assistant turn. A list of conversations is a batch.

    Parameters: `prompt` (text that goes with the audio in the user turn), `sampling_rate` (of bare arrays),
    `segmentation_mode` ("faithful"/"fast"), and generation parameters, either directly (`max_new_tokens=64`,
    `do_sample=True`, ...) or as `generate_kwargs={...}`, not both for the same key.

    Output per input: `{"text": str, "audio": np.ndarray float32, "sampling_rate": int}`.
    """

    _load_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_image_processor = False
    _pipeline_calls_generate = True

    def __call__(self, inputs, **kwargs):
        """Answer one input or a list of inputs (see the class docstring); a list gives a list of answers."""
        if isinstance(inputs, list) and not inputs:
            raise ValueError("The speech-to-speech pipeline got an empty list of inputs; pass at least one clip.")
        if is_conversation(inputs):
            return super().__call__(_Conversation(inputs), **kwargs)
        if isinstance(inputs, list) and all(is_conversation(item) for item in inputs):
            return super().__call__([_Conversation(item) for item in inputs], **kwargs)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self, sampling_rate=None, prompt=None, segmentation_mode=None, generate_kwargs=None, **kwargs
    ):
        unknown = sorted(set(kwargs) - _GENERATION_PARAMETERS)
        if unknown:
            raise ValueError(
                f"Unknown arguments for the speech-to-speech pipeline: {unknown}. Generation parameters go by their "
                "GenerationConfig names (e.g. max_new_tokens) or in generate_kwargs={...}."
            )
        preprocess = {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if prompt is not None:
            preprocess["prompt"] = prompt

        forward = dict(generate_kwargs or {})
        direct = dict(kwargs)
        if segmentation_mode is not None:
            direct["segmentation_mode"] = segmentation_mode
        for key, value in direct.items():
            if key in forward:
                raise ValueError(
                    f"'{key}' is defined twice, once in 'generate_kwargs' and once as a direct parameter, please use "
                    "only one."
                )
            forward[key] = value
        for key in _OWN_GENERATE_ARGUMENTS:
            if key in forward:
                raise ValueError(f"The speech-to-speech pipeline sets '{key}' itself; do not pass it.")
        if isinstance(forward.get("streamer"), EchoXAudioStreamer):
            raise ValueError(
                "The speech-to-speech pipeline returns whole answers; stream spoken segments with the model's "
                "`stream` method instead of an EchoXAudioStreamer."
            )
        return preprocess, forward, {}

    def _clip(self, inputs, sampling_rate):
        """One input as an audio clip for the processor: a file path, or `{"array", "sampling_rate"}`."""
        feature_rate = self.processor.feature_extractor.sampling_rate
        if isinstance(inputs, (str, os.PathLike)):
            path = os.fspath(inputs)
            if path.startswith(("http://", "https://")):
                raise ValueError(f"Audio is not fetched from URLs ({path}); download it and pass the file's path.")
            return path
        if isinstance(inputs, (bytes, bytearray)):
            return {"array": ffmpeg_read(bytes(inputs), feature_rate), "sampling_rate": feature_rate}
        if isinstance(inputs, Mapping):
            if "stride" in inputs:
                raise ValueError(
                    "A 'stride' is for CTC chunked transcription; the speech-to-speech pipeline answers whole clips."
                )
            if "sampling_rate" not in inputs or inputs.get("raw", inputs.get("array")) is None:
                raise ValueError(
                    "An audio dict needs a 'raw' (or 'array') entry holding the samples, as a numpy array or torch "
                    "tensor, and a 'sampling_rate' entry with their sample rate."
                )
            unknown = sorted(set(inputs) - _DICT_KEYS)
            if unknown:
                raise ValueError(f"Unknown entries in the audio dict: {unknown}; expected {sorted(_DICT_KEYS)}.")
            samples = inputs["raw"] if inputs.get("raw") is not None else inputs["array"]
            return {"array": samples, "sampling_rate": inputs["sampling_rate"]}
        if isinstance(inputs, (np.ndarray, torch.Tensor)):
            return {"array": inputs, "sampling_rate": feature_rate if sampling_rate is None else sampling_rate}
        raise ValueError(
            f"Unsupported input of type {type(inputs).__name__}: expected a file path, the bytes of an audio file, "
            "a numpy array or torch tensor of samples, a dict with 'raw' (or 'array') and 'sampling_rate', or a list "
            "of those (a list is a batch of clips, not the samples of one)."
        )

    def preprocess(self, inputs, sampling_rate=None, prompt=""):
        if isinstance(inputs, _Conversation):
            if prompt:
                raise ValueError("A conversation holds its own text; `prompt` is for single clips.")
            return self.processor(conversation=[self._with_clips(message, sampling_rate) for message in inputs.messages])
        return self.processor(audio=self._clip(inputs, sampling_rate), text=prompt)

    def _with_clips(self, message, sampling_rate):
        """A conversation message whose audio parts are read like the pipeline's clips (bytes, arrays, dicts)."""
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            return message
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "audio" and part.get("audio") is not None:
                part = {**part, "audio": self._clip(part["audio"], sampling_rate)}
            parts.append(part)
        return {**message, "content": parts}

    def _forward(self, model_inputs, **generate_kwargs):
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        output = self.model.generate(**model_inputs, processor=self.processor, **generate_kwargs)
        return {"text": output.text, "audio": output.waveforms}

    def postprocess(self, model_outputs):
        # One sample: either a batch of one (lists of one entry) or, when `batch_size` > 1, the item the base class
        # took out of a batch (the text itself, the waveform with a batch axis of one).
        text, audio = model_outputs["text"], model_outputs["audio"]
        return {
            "text": text if isinstance(text, str) else text[0],
            "audio": audio[0].numpy().astype(np.float32),
            "sampling_rate": self.model.config.vocoder_config.sampling_rate,
        }
