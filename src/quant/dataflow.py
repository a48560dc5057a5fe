"""The dataflow of a quantized network, read from its own `construct`: the one description that training and
integer inference compile is also what links each layer to the quantizer of its input and what an exporter
writes.

`trace(network, target, *inputs)` runs the network's construct in Python (PyNative mode) on symbolic values
instead of tensors; every quantized layer (a cell with `lower`) hands itself and its inputs to `target` instead
of computing, and the target returns the symbolic value of its output. The containers (blocks, sequences, the
network) run their own construct unchanged, so the order of `__init__` plays no part. A target has one method
per deployed operator: quantize (a float input), conv, dense, add and global_average_pool.
"""
import functools

import mindspore as ms


def trace(network, target, *inputs):
    """network's construct on `inputs`, each quantized layer lowered to `target`; returns the output value."""
    lowered = [cell for _, cell in network.cells_and_names() if hasattr(cell, "lower")]
    mode = ms.get_context("mode")
    for cell in lowered:
        cell.construct = functools.partial(cell.lower, target)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return network(*inputs)
    finally:
        ms.set_context(mode=mode)
        for cell in lowered:
            del cell.construct


class _Quantized:
    """A value of the linking trace: the activation quantizer whose codes it is (None: the float input)."""

    def __init__(self, quantizer):
        self.quantizer = quantizer


class _InputLinker:
    """The target that gives each convolution and dense layer the quantizer of the tensor flowing into it."""

    @staticmethod
    def quantize(layer, x):
        return _Quantized(layer.output_quant)

    @staticmethod
    def conv(layer, x):
        if x.quantizer is None:
            raise ValueError("a quantized layer takes the network's float input: quantize the input first (an "
                             "activation quantizer before it)")
        layer.input_quantizer = (x.quantizer,)
        return _Quantized(layer.output_quant)

    dense = conv

    @staticmethod
    def add(layer, a, b):
        return _Quantized(layer.output_quant)

    @staticmethod
    def global_average_pool(layer, x):
        return _Quantized(layer.output_quant)


def link_input_quantizers(network):
    """Give each quantized convolution and dense layer of `network` the quantizer whose output it takes, as the
    network's construct passes it: the scale its bias is rounded at in training (`deployed_bias`)."""
    trace(network, _InputLinker, _Quantized(None))
