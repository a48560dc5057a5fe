"""Mixed-precision plans: which layers' weights keep more bits than the others. `analyze.py --weight_bits_budget`
chooses one from the sensitivity report and writes it; `train.py --bits_plan` trains with it, and every
checkpoint records it (`layer_weight_bits`), so evaluation and export build the same network.

A plan file is JSON: {"weight_bits": 4, "layer_weight_bits": {"features.0": 7, ...}, ...}, the layers it does
not name taking weight_bits; the other keys (budget, average_weight_bits, source) say how it was made.
"""
import json

from src.quant.fake_quant import MAX_BITS, MIN_BITS


class BitsPlanError(ValueError):
    pass


def average_weight_bits(sizes, weight_bits, layer_weight_bits):
    """Bits per weight over the layers `sizes` names ({layer: weight count}), at weight_bits except where
    `layer_weight_bits` says otherwise: the packed model's size in bits over its weight count."""
    total = sum(sizes.values())
    return sum(size * layer_weight_bits.get(name, weight_bits) for name, size in sizes.items()) / total


def check_budget(weight_bits, wide_bits, budget):
    """Raise BitsPlanError if no plan can widen layers from weight_bits to wide_bits within `budget`."""
    if not weight_bits < wide_bits <= MAX_BITS:
        raise BitsPlanError(f"the wide bit width ({wide_bits}) must exceed weight_bits ({weight_bits}) and be at "
                            f"most {MAX_BITS}")
    if budget < weight_bits:
        raise BitsPlanError(f"a budget of {budget} average bits is below weight_bits ({weight_bits}): every "
                            f"layer takes at least weight_bits")


def choose(sensitivity, sizes, weight_bits, wide_bits, budget):
    """{layer: wide_bits} for the layers whose widening removes the most logit noise per bit of the budget.

    sensitivity: {layer: logit SQNR in dB with only that layer's weights quantized at weight_bits} (lower: more
    sensitive); sizes: {layer: weight count}. A layer's logit noise is 10^(-SQNR/10) of the logits' power; each
    bit more divides its weights' rounding noise by 4, so widening it removes that noise times
    1 - 4^-(wide_bits - weight_bits), for size * (wide_bits - weight_bits) bits. Layers are taken by noise removed
    per weight, highest first (a knapsack's greedy order), each widened if the average bits per weight stays within
    `budget`; one that does not fit is passed over for the next. Worst SQNR first would spend the budget on a large
    layer whose noise a few small ones match: on the tests' network that plan came out no better than uniform
    bits."""
    check_budget(weight_bits, wide_bits, budget)
    plan = {}
    for layer in sorted(sensitivity, key=lambda name: -10 ** (-sensitivity[name] / 10) / sizes[name]):
        trial = dict(plan, **{layer: wide_bits})
        if average_weight_bits(sizes, weight_bits, trial) <= budget:
            plan = trial
    return plan


def write(path, weight_bits, layer_weight_bits, **record):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(weight_bits=weight_bits, layer_weight_bits=layer_weight_bits, **record), f, indent=2)
        f.write("\n")


def read(path):
    """(weight_bits, {layer: bits}) of a plan file, with an error naming what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except FileNotFoundError:
        raise BitsPlanError(f"bits plan not found: {path}") from None
    except (OSError, ValueError) as err:
        raise BitsPlanError(f"cannot read bits plan {path}: {err}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("weight_bits"), int) \
            or not isinstance(plan.get("layer_weight_bits"), dict):
        raise BitsPlanError(f"bits plan {path} must be a JSON object with an integer \"weight_bits\" and a "
                            f"\"layer_weight_bits\" object of layer name: bits")
    layers = plan["layer_weight_bits"]
    wrong = [f"{name}: {bits!r}" for name, bits in layers.items()
             if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS]
    if wrong or not MIN_BITS <= plan["weight_bits"] <= MAX_BITS:
        raise BitsPlanError(f"bits plan {path}: bit widths must be integers from {MIN_BITS} to {MAX_BITS}; got "
                            f"{', '.join(wrong) or 'weight_bits: ' + str(plan['weight_bits'])}")
    return plan["weight_bits"], layers
