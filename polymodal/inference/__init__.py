"""Fast inference: weight-only quantisation and a compiled static-shape decode step."""
from .fast import FastDecoder, default_plan, greedy_decode, prepare_for_decoding
from .quant import Int4Linear, Int8Linear, QuantLinear, quantize, quantized_bytes, set_quant_impl

__all__ = ["FastDecoder", "Int4Linear", "Int8Linear", "QuantLinear", "default_plan", "greedy_decode",
           "prepare_for_decoding", "quantize", "quantized_bytes", "set_quant_impl"]
