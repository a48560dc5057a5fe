"""Per-tensor quantization sensitivity: what quantizing each tensor alone (one layer's weights, one activation)
costs, with every other tensor left in float.

For each quantizer of a quantized network, only its rounding is switched on (`quant_enabled`), the network is run
in inference mode with fake quantization (not the integer model's arithmetic, which rounds everything) over a
fixed set of images, and two figures are taken against the all-float run of the same network (same folded BN,
same ranges, nothing rounded): top-1 accuracy, and the signal-to-quantization-noise ratio of the logits,
10 log10(sum(reference^2) / sum((logits - reference)^2)) in dB. Low SQNR and lost accuracy point at the tensors
that want more bits, a wider range or a closer look.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from src.evaluation import network_predictor
from src.quant.layers import set_integer_inference
from src.quant.observers import PerChannelAbsMaxObserver
from src.quant.quantizer import Quantizer
from src.quant.schedule import set_switches


def quantizers(network):
    """(name, quantizer) of every quantized tensor of `network`, in network order."""
    return [(name, cell) for name, cell in network.cells_and_names() if isinstance(cell, Quantizer)]


def _kind(quantizer):
    return "weights" if isinstance(quantizer.observer, PerChannelAbsMaxObserver) else "activation"


def describe(name, quantizer):
    """'features.3.conv.1 weights' or 'features.3.conv.1 output' for the quantizer named `name`; the network's
    own input_quant and pool_quant are 'input' and 'pool'."""
    owner, _, role = name.rpartition(".")
    if _kind(quantizer) == "weights":
        return f"{owner} weights"
    return f"{owner} output" if owner else role.replace("_quant", "")


def sqnr_db(reference, quantized):
    noise = float(np.sum(np.square(quantized.astype(np.float64) - reference)))
    signal = float(np.sum(np.square(reference.astype(np.float64))))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def top1(logits, labels):
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _logits(predict, images):
    return np.concatenate([predict(batch) for batch in images])


def measure(network, images, labels, batch_size):
    """Sensitivity of every quantized tensor of `network` (ranges as they are) over `images` (a list of batches)
    and `labels` (all of them, concatenated). Returns (reference, all_quantized, rows): the all-float and the
    fully quantized {"acc", "sqnr_db"}, and one row per tensor {"tensor", "layer" (the quantizer's owner, ""
    for the network's input and pool), "kind", "acc", "sqnr_db"}, in network order. The rounding switches are
    left as they were; the network's inference is fake quantization afterwards (set_integer_inference)."""
    set_integer_inference(network, False)
    predict = network_predictor(network, batch_size)
    found = quantizers(network)
    before = {name: quantizer.quant_enabled.asnumpy().copy() for name, quantizer in found}
    try:
        set_switches(network, Quantizer, "quant_enabled", True)
        everything = _logits(predict, images)
        set_switches(network, Quantizer, "quant_enabled", False)
        reference = _logits(predict, images)
        rows = []
        for name, quantizer in found:
            quantizer.quant_enabled.set_data(Tensor(1.0, ms.float32))
            logits = _logits(predict, images)
            quantizer.quant_enabled.set_data(Tensor(0.0, ms.float32))
            rows.append({"tensor": describe(name, quantizer), "layer": name.rpartition(".")[0],
                         "kind": _kind(quantizer), "acc": top1(logits, labels), "sqnr_db": sqnr_db(reference, logits)})
    finally:
        for name, quantizer in found:
            quantizer.quant_enabled.set_data(Tensor(before[name]))
    return ({"acc": top1(reference, labels), "sqnr_db": float("inf")},
            {"acc": top1(everything, labels), "sqnr_db": sqnr_db(reference, everything)}, rows)


def worst_first(rows):
    """Rows sorted by logit SQNR, lowest first: a finer measure than top-1 over a few hundred images, where one
    tensor alone rarely changes a prediction."""
    return sorted(rows, key=lambda row: row["sqnr_db"])


def table(reference, everything, rows, bits, images):
    """The report as Markdown: worst tensors first."""
    lines = [f"Quantization sensitivity over {images} images: {bits}. Each row quantizes that tensor alone.",
             f"float (nothing rounded): top-1 {100 * reference['acc']:.2f}%; all quantized: top-1 "
             f"{100 * everything['acc']:.2f}%, logit SQNR {everything['sqnr_db']:.1f} dB", "",
             "| tensor | kind | top-1 | logit SQNR (dB) |", "|---|---|---|---|"]
    lines += [f"| {row['tensor']} | {row['kind']} | {100 * row['acc']:.2f}% | {row['sqnr_db']:.1f} |"
              for row in worst_first(rows)]
    return "\n".join(lines)


def draw(rows, path, title, shown=40):
    """Bar chart of the logit SQNR of the `shown` most sensitive tensors (lowest SQNR first, on top): 1000 x 1000
    pixels, weights and activations in two colours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt
    worst = worst_first(rows)[:shown][::-1]
    figure, axis = plt.subplots(figsize=(10, 10), dpi=100)
    colours = ["tab:blue" if row["kind"] == "weights" else "tab:orange" for row in worst]
    axis.barh([row["tensor"] for row in worst], [row["sqnr_db"] for row in worst], color=colours)
    axis.set_xlabel("logit SQNR with only this tensor quantized (dB; lower = more sensitive)")
    axis.set_title(title)
    axis.tick_params(axis="y", labelsize=7)
    axis.legend(handles=[matplotlib.patches.Patch(color="tab:blue", label="weights"),
                         matplotlib.patches.Patch(color="tab:orange", label="activation")])
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
