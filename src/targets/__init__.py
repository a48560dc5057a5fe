"""Deployment targets. A target is one object (`DeploymentTarget`, src/targets/target.py): the integer arithmetic
that inference of a quantized network computes as the target's runtime does (`arithmetic`: one method per deployed
operator, in MindSpore ops), the writer of its file (`export`) and the runtime that runs the file (`predictor`).
Each quantized layer lowers itself to the arithmetic and to the writer (`lower`, src/quant/dataflow.py): integer
inference inside the compiled graph, export by tracing the network's construct."""
from src.targets.litert import LITERT
from src.targets.onnx_runtime import ONNX_RUNTIME

# What the quantized layers compute in integer inference.
DEFAULT_TARGET = ONNX_RUNTIME
# The target that writes each integer file format export.py offers.
BY_FILE_FORMAT = {target.file_format: target for target in (ONNX_RUNTIME, LITERT)}
