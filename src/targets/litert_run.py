"""An int8 .tflite model run by LiteRT's interpreter on its default CPU path (XNNPACK), with NumPy and LiteRT only:
the x86 evaluation imports it, and scripts/run_litert_arm.sh runs it as a script under an emulated ARM CPU.

    python src/targets/litert_run.py MODEL.tflite INPUTS.npy LOGITS.npy   # inputs (N, H, W, 3) float32
"""
import sys

import numpy as np


def fully_delegated(interpreter):
    """Whether an allocated LiteRT interpreter runs its whole model in one XNNPACK partition: one delegate node that
    computes the model's output, no operator left to the builtin kernels (which round otherwise)."""
    delegated = [op for op in interpreter._get_ops_details() if op["op_name"] == "DELEGATE"]
    output = interpreter.get_output_details()[0]["index"]
    return len(delegated) == 1 and list(delegated[0]["outputs"]) == [output]


class TfliteRunner:
    """images (N, H, W, 3) float32 -> logits, any N; `size` is the (H, W) the model takes. `on_allocate(interpreter)`
    is called once, after the first allocation (to check the delegation)."""

    def __init__(self, path, on_allocate=None):
        from ai_edge_litert.interpreter import Interpreter
        self.interpreter = Interpreter(model_path=path, num_threads=1)
        self.input = self.interpreter.get_input_details()[0]
        self.size = tuple(int(d) for d in self.input["shape"][1:3])
        self.batch, self.on_allocate = None, on_allocate

    def __call__(self, images):
        interpreter = self.interpreter
        if self.batch != len(images):
            interpreter.resize_tensor_input(self.input["index"], [len(images), *self.size, 3])
            interpreter.allocate_tensors()
            if self.batch is None and self.on_allocate:
                self.on_allocate(interpreter)
            self.batch = len(images)
        interpreter.set_tensor(self.input["index"], np.ascontiguousarray(images, np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def main(model, inputs, output, batch_size=32):
    images = np.load(inputs)
    checked = []
    run = TfliteRunner(model, lambda interpreter: checked.append(fully_delegated(interpreter)))
    logits = np.concatenate([run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    np.save(output, logits)
    print(f"{model}: {len(images)} images, every operator on XNNPACK: {'yes' if checked[0] else 'NO'}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
