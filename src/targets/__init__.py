"""Deployment targets. A target is one object: the integer arithmetic that inference of a quantized network
computes as the target's runtime does (`arithmetic`: one method per deployed operator, in MindSpore ops) and the
writer of its file (`export`). Each quantized layer lowers itself to both (`lower`, src/quant/dataflow.py):
integer inference inside the compiled graph, export by tracing the network's construct."""
from src.targets.litert import LiteRT
from src.targets.onnx_runtime import OnnxRuntime

# What the quantized layers compute in integer inference.
DEFAULT_TARGET = OnnxRuntime
# The target that writes each integer file format export.py offers.
BY_FILE_FORMAT = {target.file_format: target for target in (OnnxRuntime, LiteRT)}
