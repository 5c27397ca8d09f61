"""EchoX for transformers. Importing this package registers EchoX with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .mini.assembly import ensure_mini
from .model.configuration_echox import (
    EchoXConfig,
    EchoXEchoDecoderConfig,
    EchoXVocoderConfig,
)
from .model.generation_configuration_echox import EchoXGenerationConfig
from .model.loading import load_echox
from .model.modeling_echox import (
    EchoXForSpeechToSpeech,
    EchoXGenerationOutput,
    EchoXOutput,
    EchoXPreTrainedModel,
)
from .model.pipeline_echox import SpeechToSpeechPipeline
from .model.processing_echox import EchoXProcessor
from .model.streaming import EchoXAudioStreamer, EchoXStreamChunk
from .model.unit_vocabulary import EchoXUnitVocabulary
from .model.vocoder import EchoXCodeHifiGan
from .model.vocoder_istft import EchoXIstftGenerator
from .model.voicing import EchoXVoicer
from .serving import EchoXServer, EchoXServerBusy
from .units.extractor import EchoXUnitExtractor
from .units.kmeans import EchoXUnitKMeans, fit_kmeans
from .units.unit_language import EchoXUnitLanguage, train_unit_language

__version__ = "0.1.0"

AutoConfig.register(EchoXConfig.model_type, EchoXConfig, exist_ok=True)
AutoConfig.register(EchoXEchoDecoderConfig.model_type, EchoXEchoDecoderConfig, exist_ok=True)
AutoConfig.register(EchoXVocoderConfig.model_type, EchoXVocoderConfig, exist_ok=True)
AutoModel.register(EchoXConfig, EchoXForSpeechToSpeech, exist_ok=True)
AutoModel.register(EchoXVocoderConfig, EchoXCodeHifiGan, exist_ok=True)
AutoModelForMultimodalLM.register(EchoXConfig, EchoXForSpeechToSpeech, exist_ok=True)
AutoProcessor.register(EchoXConfig, EchoXProcessor, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline("speech-to-speech", pipeline_class=SpeechToSpeechPipeline, pt_model=AutoModel)

# Saved checkpoints carry `auto_map` and this code, so `trust_remote_code=True` loads them without this package.
EchoXConfig.register_for_auto_class()
EchoXForSpeechToSpeech.register_for_auto_class("AutoModel")
EchoXProcessor.register_for_auto_class()

__all__ = [
    "EchoXAudioStreamer",
    "EchoXStreamChunk",
    "SpeechToSpeechPipeline",
    "EchoXCodeHifiGan",
    "EchoXConfig",
    "EchoXEchoDecoderConfig",
    "EchoXForSpeechToSpeech",
    "EchoXGenerationConfig",
    "EchoXGenerationOutput",
    "EchoXIstftGenerator",
    "EchoXOutput",
    "EchoXPreTrainedModel",
    "EchoXProcessor",
    "EchoXServer",
    "EchoXServerBusy",
    "EchoXUnitExtractor",
    "EchoXUnitKMeans",
    "EchoXUnitLanguage",
    "EchoXUnitVocabulary",
    "EchoXVoicer",
    "ensure_mini",
    "load_echox",
    "fit_kmeans",
    "train_unit_language",
    "EchoXVocoderConfig",
]
