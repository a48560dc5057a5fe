"""The quantization mechanism: fake-quantizer, observers, quantizers, quantized layers and their schedule."""
