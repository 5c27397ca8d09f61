"""Dynamic int8 quantization of EchoX for CPU inference (an option; the checkpoints stay in full precision)."""

import warnings

import torch
from torch import nn


def quantize_int8(model, per_channel: bool = True):
    """
    Replace the `nn.Linear` layers of the LLM's decoder layers and of the adapter's CTC head by dynamically quantized
    int8 ones (`torch.ao.quantization.quantize_dynamic`: int8 weights, activations quantized per call), in place.
    Prefill and the adapter run about twice as fast on a CPU. `per_channel` (default) gives every output row its own
    weight scale; `False` uses one scale per matrix, which costs EchoX-mini much more accuracy (MODEL_CARD.md).
    The token embeddings and the LLM output table stay in full precision: the echo decoder reads that table.
    Inference only: a quantized model cannot be trained or saved. Returns the model.
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    if getattr(model, "is_int8_quantized", False):
        return model
    if any(parameter.requires_grad for parameter in model.language_model.parameters()) and model.training:
        raise ValueError("quantize_int8 is for inference: call model.eval() first (the quantized layers cannot train).")
    decoder = model.language_model.get_decoder()
    adapter = model.speech_adapter
    with warnings.catch_warnings():  # torch marks its quantized tensor constructors as deprecated
        warnings.simplefilter("ignore")
        spec = {nn.Linear: per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig}
        quantize_dynamic(decoder, spec, dtype=torch.qint8, inplace=True)
        adapter.ctc_head = quantize_dynamic(nn.Sequential(adapter.ctc_head), spec, dtype=torch.qint8)[0]
    model.is_int8_quantized = True
    return model
