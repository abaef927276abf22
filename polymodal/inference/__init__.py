"""Fast inference: weight-only quantisation and a compiled static-shape decode step."""
from .fast import FastDecoder, default_plan, greedy_decode, prepare_for_decoding, resolve_quant
from .quant import (Int4Linear, Int8GroupLinear, Int8Linear, QuantFactors, QuantLinear, layer_from_factors, quantize,
                    quantized_bytes, set_quant_impl)

__all__ = ["FastDecoder", "Int4Linear", "Int8GroupLinear", "Int8Linear", "QuantFactors", "QuantLinear", "default_plan",
           "greedy_decode", "layer_from_factors", "prepare_for_decoding", "quantize", "quantized_bytes",
           "resolve_quant", "set_quant_impl"]
