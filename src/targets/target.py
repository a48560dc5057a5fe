"""What a deployment target is: one object with everything the project does for one runtime."""
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class DeploymentTarget:
    name: str          # as the project names it
    runtime: str       # as a person names it
    file_format: str   # export.py --file_format
    suffix: str        # of the files it writes and runs
    # The integer arithmetic integer inference computes for it: one static method per deployed operator
    # (quantize, conv, dense, add, global_average_pool), each given the layer and its quantized inputs, in
    # MindSpore ops (src/quant/dataflow.py).
    arithmetic: type
    export: Callable   # (quantized network, path, (channels, height, width)): writes its file
    predictor: Callable  # path -> images -> logits, in the runtime itself


def to_numpy(value):
    """A MindSpore tensor or an array-like as a NumPy array: what the writers store."""
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
