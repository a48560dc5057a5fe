"""QAT learns: where rounding costs accuracy, QAT from the same float checkpoint wins it back, with observed ranges
(min/max) and with learned step sizes (LSQ); calibration alone (post-training quantization) does not.

The case, from measurements on a learned float network (4 demo classes, width 0.25, 32x32, 240 validation
images) at MobileNetV2's full depth: 4-bit weights lose too little there to tell (float 95.4%, PTQ 96.7% on an
AVX2-only machine at batch 8), 3-bit weights lose enough. BN is frozen from QAT's first step, so that only learning
can win the loss back: with BN statistics re-estimated under the quantized weights (BN frozen after one epoch),
QAT with the weights' gradient cut reached 94.2% (min/max) and 94.6% (LSQ, all its gradients cut) from PTQ's
83.3%, and the test passed without testing learning. With BN frozen from the start, on a 2-core AMD EPYC (AVX-512
VNNI, 2026-12-06): float 97.9%, PTQ 83.3%, 2 QAT epochs at lr 0.005 96.3% (min/max) and 97.5% (LSQ); with the
weights' gradient cut 82.9% (min/max), with LSQ's gradients cut 83.8%: both fail here. The test asks for a loss of
at least 2 points (5 images) and for QAT to win back at least half of it. With the bit widths not recorded in the
checkpoint, evaluation runs at 7 bits and PTQ loses nothing: that fails too.
At 4-bit activations (W4A4) this small network needs more than the test's 20 steps: PTQ 88.3%, QAT 89.6% (min/max)
and 88.3% (LSQ) after 2 epochs, 91.3% and 92.1% after 8 (same AMD EPYC, BN frozen for the last epoch).

Why full depth, when the other tests on a learned network run depth 0.3 (conftest's learned_float): at depth 0.3
the biases alone win back much of what rounding the weights loses, so a run with the weights' gradient cut passes
(2-core AMD EPYC, AVX2, 2026-12-08, seed 1: 2-bit weights, PTQ 34.6%, QAT 10 epochs 96.7%, with the weights'
gradient cut 73.3%; seed 2: W3A3, PTQ 69.6%, QAT 83.8%, cut 79.2%), and 3-bit weights lose as little as 2 points
at seed 3. At full depth the float network reached only 72.1% at TEST_SEED 2 on that machine, and there this test
fails (min/max: PTQ 58.3%, QAT 62.1%); seeds 1 and 3 pass.
"""
import pytest

import train as train_script
from src import checkpoint

from conftest import evaluate_learned, learned_argv, train_learned_float

WEIGHT_BITS = "3"
DEEP_ARGV = learned_argv(depth_mult=1.0)
# Each quantizer's ranges over QAT's 2 epochs: min/max ranges observed throughout; LSQ's step sizes taken from the
# ranges observed in epoch 1 and learned in epoch 2.
QUANTIZER_ARGV = {"minmax": ["--freeze_observer_epochs", "2"],
                  "lsq": ["--quantizer", "lsq", "--freeze_observer_epochs", "1"]}


@pytest.fixture(scope="module")
def deep_learned_float(learning_data, tmp_path_factory):
    """conftest's learned_float at MobileNetV2's full depth."""
    return train_learned_float(learning_data, tmp_path_factory, "deep_learned_float", 1.0)


@pytest.fixture(scope="module")
def float_and_ptq_accuracy(learning_data, deep_learned_float, tmp_path_factory):
    """Top-1 of the learned float network and of its post-training quantization at WEIGHT_BITS."""
    train_path, val_path = learning_data
    ptq = train_script.main(["--mode", "ptq", "--pre_trained", deep_learned_float, "--dataset_path", train_path,
                             *DEEP_ARGV, "--weight_bits", WEIGHT_BITS, "--calibration_batches", "10",
                             "--save_checkpoint_path", str(tmp_path_factory.mktemp("ptq"))])
    assert checkpoint.read(ptq)[1]["weight_bits"] == int(WEIGHT_BITS)
    return evaluate_learned(deep_learned_float, val_path)["acc"], evaluate_learned(ptq, val_path)["acc"]


@pytest.mark.xdist_group("learning")
@pytest.mark.parametrize("quantizer", list(QUANTIZER_ARGV))
def test_qat_wins_back_what_calibration_loses(quantizer, learning_data, deep_learned_float, float_and_ptq_accuracy,
                                              tmp_path):
    train_path, val_path = learning_data
    qat = train_script.main(["--pre_trained", deep_learned_float, "--dataset_path", train_path, *DEEP_ARGV,
                             "--weight_bits", WEIGHT_BITS, *QUANTIZER_ARGV[quantizer], "--start_epoch", "0",
                             "--epoch_size", "2", "--lr", "0.005", "--freeze_bn_epochs", "0",
                             "--save_checkpoint_path", str(tmp_path / "qat")])
    meta = checkpoint.read(qat)[1]
    assert (meta["weight_bits"], meta["quantizer"]) == (int(WEIGHT_BITS), quantizer)
    float_acc, ptq_acc = float_and_ptq_accuracy
    qat_acc = evaluate_learned(qat, val_path)["acc"]
    print(f"float {float_acc:.4f}, PTQ {ptq_acc:.4f}, QAT ({quantizer}) {qat_acc:.4f} ({WEIGHT_BITS}-bit weights)")
    assert float_acc - ptq_acc >= 0.02
    assert qat_acc - ptq_acc >= 0.5 * (float_acc - ptq_acc)
