"""`pipeline("speech-to-speech")`: a spoken question in, the text and spoken answer out."""

import numpy as np
from transformers import Pipeline


class SpeechToSpeechPipeline(Pipeline):
    """
    Answers spoken questions with an EchoX checkpoint.

    Inputs: an audio file path, a 1-D array (with `sampling_rate=`), a `{"array", "sampling_rate"}` dict, or a list of
    them. Optional `prompt` (text that goes with the audio in the user turn), `segmentation_mode` ("faithful"/"fast")
    and generation arguments in `generate_kwargs` (e.g. `{"max_new_tokens": 64}`).

    Output per input: `{"text": str, "audio": np.ndarray float32, "sampling_rate": int}`.
    """

    _load_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_image_processor = False

    def _sanitize_parameters(self, sampling_rate=None, prompt=None, segmentation_mode=None, generate_kwargs=None, **kwargs):
        if kwargs:
            raise ValueError(f"Unknown arguments for the speech-to-speech pipeline: {sorted(kwargs)}")
        preprocess = {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if prompt is not None:
            preprocess["prompt"] = prompt
        forward = dict(generate_kwargs or {})
        if segmentation_mode is not None:
            forward["segmentation_mode"] = segmentation_mode
        return preprocess, forward, {}

    def preprocess(self, audio, sampling_rate=None, prompt=""):
        return self.processor(audio=audio, text=prompt, sampling_rate=sampling_rate)

    def _forward(self, model_inputs, **generate_kwargs):
        return self.model.generate(**model_inputs, tokenizer=self.processor.tokenizer, **generate_kwargs)

    def postprocess(self, model_outputs):
        return {
            "text": model_outputs.text[0],
            "audio": model_outputs.waveforms[0].numpy().astype(np.float32),
            "sampling_rate": model_outputs.sampling_rate,
        }
