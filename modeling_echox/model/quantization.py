"""Dynamic int8 quantization of EchoX for CPU inference (an option; the checkpoints stay in full precision)."""

import warnings

import torch
from torch import nn


def quantize_int8(model):
    """
    Replace the `nn.Linear` layers of the LLM's decoder layers and of the adapter's CTC head by dynamically quantized
    int8 ones (`torch.ao.quantization.quantize_dynamic`: int8 weights, activations quantized per call), in place.
    Prefill and the adapter run about twice as fast on a CPU, but int8 activations can cost much accuracy
    (MODEL_CARD.md gives EchoX-mini's figures): evaluate before use. The token embeddings and the LLM output table stay
    in full precision: the echo decoder reads that table. Inference only: a quantized model cannot be trained or saved.
    Returns the model.
    """
    from torch.ao.quantization import quantize_dynamic

    if getattr(model, "is_int8_quantized", False):
        return model
    if any(parameter.requires_grad for parameter in model.language_model.parameters()) and model.training:
        raise ValueError("quantize_int8 is for inference: call model.eval() first (the quantized layers cannot train).")
    decoder = model.language_model.get_decoder()
    adapter = model.speech_adapter
    with warnings.catch_warnings():  # torch marks its quantized tensor constructors as deprecated
        warnings.simplefilter("ignore")
        quantize_dynamic(decoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
        adapter.ctc_head = quantize_dynamic(nn.Sequential(adapter.ctc_head), {nn.Linear}, dtype=torch.qint8)[0]
    model.is_int8_quantized = True
    return model
