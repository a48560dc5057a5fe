"""End to end on a tiny demo dataset: float training, QAT from it, evaluation, exact resume, and the errors
users hit first (data, checkpoints, config)."""
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
from easydict import EasyDict

import eval as eval_script
from mindspore import nn, Tensor

from src import checkpoint, trainer
from src.config import config_cpu
from src.curves import read_curves
from src.dataset import MEAN, STD, DatasetError, check_input_record, input_record
from src.trainer import train, TrainingError

from conftest import ROOT, TINY, checkpoint_arrays, gradient_moved_all, qat_run_argv, tiny_argv


def tiny_config(**overrides):
    return EasyDict(dict(config_cpu, **dict(TINY, **overrides)))


def test_float_then_qat_then_eval_through_the_scripts(demo_data, float_run, qat_run, capsys):
    _, val_path = demo_data
    _, meta = checkpoint.read(float_run)
    assert meta["network_kind"] == "float" and meta["epoch_num"] == 2
    last, train_log = qat_run
    assert "effective config:" in train_log and "lr: this run sees" in train_log
    assert "epoch: [  1/  2], step:[    5/    6], loss:[" in train_log and "per step time:" in train_log
    assert re.search(r"avg loss: [\d.]+, [\d.]+ img/s, time left: 0:00:00\n", train_log)  # the last epoch's line
    # a checkpoint every 4 global steps and at each epoch end, and the best validated network beside them
    best = os.path.join(os.path.dirname(last), "mobilenetV2_quant-best.ckpt")
    assert os.path.basename(last) == "mobilenetV2_quant-2_6.ckpt"
    assert sorted(os.listdir(os.path.dirname(last))) == \
        [f"mobilenetV2_quant-{n}.ckpt" for n in ("1_4", "1_6", "2_2", "2_6", "best")]
    mid_epoch = checkpoint.read(os.path.join(os.path.dirname(last), "mobilenetV2_quant-2_2.ckpt"))[1]
    assert (mid_epoch["epoch_num"], mid_epoch["step_num"]) == (1, 8)
    params, meta = checkpoint_arrays(last)
    assert meta["network_kind"] == "quant" and meta["epoch_num"] == 2 and meta["step_num"] == 12
    assert params["features.0.bn_frozen"] == 1 and params["input_quant.observer.enabled"] == 0
    assert params["input_quant.observer.min_val"] < 0 < params["input_quant.observer.max_val"]

    result = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", last, "--network", "quant",
                               *tiny_argv(batch_size=5)])
    log = capsys.readouterr().out
    assert result["images"] == 24  # every image, the last partial batch included (24 = 4 * 5 + 4)
    assert 0.0 <= result["acc"] <= result["top5"] <= 1.0
    assert f"result:{{'acc': {result['acc']}" in log and os.path.basename(last) in log
    with pytest.raises(SystemExit, match="--network float given, but .* holds a quant network"):
        eval_script.main(["--dataset_path", val_path, "--checkpoint_path", last, "--network", "float", *tiny_argv()])
    # validation during training: each epoch's figures, the best network kept, scored as eval.py scores it
    validated = [float(acc) for acc in re.findall(r"epoch: [12], val acc: ([\d.]+), top5: [\d.]+\n", train_log)]
    assert len(validated) == 2
    _, best_meta = checkpoint.read(best)
    assert best_meta["val_acc"] == pytest.approx(max(validated), abs=1e-4)
    assert eval_script.main(["--dataset_path", val_path, "--checkpoint_path", best, *tiny_argv()])["acc"] == \
        pytest.approx(best_meta["val_acc"])


def test_checkpoints_record_their_input_and_eval_takes_it(demo_data, float_run, tmp_path, capsys):
    """A checkpoint trained at 16x16 is evaluated at 16x16 unless another size is asked for (then a warning);
    checkpoints written before the record load as before."""
    _, val_path = demo_data
    _, meta = checkpoint.read(float_run)
    assert (meta["image_height"], meta["image_width"]) == (16, 16)
    np.testing.assert_allclose(meta["input_mean"], MEAN)
    np.testing.assert_allclose(meta["input_std"], STD)
    capsys.readouterr()
    explicit = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", float_run, *tiny_argv()])
    assert "input size" not in capsys.readouterr().out  # the user said it: nothing to add
    unsized = tiny_argv(without=("image_height", "image_width"))
    recorded = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", float_run, *unsized])
    out = capsys.readouterr().out
    assert "input size 16x16, as" in out and "  image_height: 16\n" in out and recorded == explicit
    eval_script.main(["--dataset_path", val_path, "--checkpoint_path", float_run, *unsized, "--image_height", "24"])
    out = capsys.readouterr().out
    assert "was trained on 16x16 images; using 24x16 as --image_height/--image_width ask" in out
    # a checkpoint from before the record: loads, at the size given
    entries, meta = checkpoint.read(float_run)
    old = str(tmp_path / "old.ckpt")
    ms.save_checkpoint([{"name": name, "data": value} for name, value in entries.items()], old,
                       append_dict={k: v for k, v in meta.items() if k not in checkpoint.INPUT_KEYS})
    assert "image_height" not in checkpoint.read(old)[1]
    assert eval_script.main(["--dataset_path", val_path, "--checkpoint_path", old, *tiny_argv()]) == explicit


def test_resume_of_another_run_is_refused_naming_what_differs(demo_data, qat_run, tmp_path):
    with pytest.raises(TrainingError, match="trained with image_height 16, this run asks for 24: give "
                                            "--image_height 16"):
        train(tiny_config(image_height=24, start_epoch=2, epoch_size=2, save_checkpoint_path=str(tmp_path)),
              demo_data[0], resume=qat_run[0])
    with pytest.raises(TrainingError, match="follows a learning-rate schedule of 12 steps, this run one of 18: "
                                            "resume with the run's --epoch_size"):
        train(tiny_config(start_epoch=2, epoch_size=3, save_checkpoint_path=str(tmp_path)), demo_data[0],
              resume=qat_run[0])


@pytest.mark.quick
def test_another_normalisation_is_refused():
    config = tiny_config()
    record = dict(input_record(config), input_mean=[127.5] * 3, input_std=[127.5] * 3)
    with pytest.raises(DatasetError, match="m.ckpt was trained on inputs normalised with mean \\[127.5"):
        check_input_record(config, record, "m.ckpt")


def test_resume_continues_exactly(demo_data, float_run, qat_run, tmp_path):
    """qat_run's command, resumed from its checkpoint in the middle of epoch 1 (BN statistics are re-estimated and
    BN and observers freeze at the start of epoch 2, after the resume): it ends where qat_run ended, bit for bit,
    the optimizer's state and the dynamic loss scale included."""
    import train as train_script
    last, log = qat_run
    assert log.count("BN statistics re-estimated over 2 batches before BN freezes") == 1
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(os.path.join(os.path.dirname(last), "mobilenetV2_quant-1_4.ckpt"), resumed_dir)
    # keep 3: the checkpoint it resumed from is the oldest, and goes once 3 newer ones are written
    resumed = train_script.main([*qat_run_argv(demo_data, float_run), "--save_checkpoint_path", str(resumed_dir),
                                 "--keep_checkpoint_max", "3", "--resume", "latest"])
    assert sorted(os.listdir(resumed_dir)) == [f"mobilenetV2_quant-{n}.ckpt" for n in ("1_6", "2_2", "2_6", "best")]
    want, _ = checkpoint_arrays(last)
    got, meta = checkpoint_arrays(resumed)
    assert gradient_moved_all(checkpoint_arrays(float_run)[0], want)
    assert meta["epoch_num"] == 2 and meta["step_num"] == 12
    assert set(want) == set(got)
    assert any(name.startswith("moments.") for name in got)  # the optimizer state is in the checkpoint
    assert got["features.0.bn_frozen"] == 1 and want["features.0.bn_frozen"] == 1
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_float_run_killed_mid_epoch_resumes_to_the_same_weights(demo_data, float_run, tmp_path):
    """float_run's own command with a checkpoint every 2 steps, killed (SIGKILL) once it has written the one in
    the middle of epoch 2, then resumed: it ends where float_run ended, bit for bit."""
    import train as train_script
    out = tmp_path / "killed"
    argv = ["--mode", "float", "--dataset_path", demo_data[0], *tiny_argv(), "--start_epoch", "0", "--epoch_size",
            "2", "--lr", "0.05", "--save_checkpoint_path", str(out), "--save_checkpoint_steps", "2"]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mid_epoch = out / "mobilenetV2_float-2_2.ckpt"
    deadline = time.time() + 900
    while not mid_epoch.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert mid_epoch.exists()
    # the kill may land a step or two later: what was written after the mid-epoch checkpoint goes
    written = trainer.list_checkpoints(str(out), quantized=False)
    for path in written[written.index(str(mid_epoch)) + 1:]:
        os.remove(path)
    resumed = train_script.main(argv + ["--resume", "latest"])
    got, meta = checkpoint_arrays(resumed)
    want, _ = checkpoint_arrays(float_run)
    assert gradient_moved_all(checkpoint_arrays(str(mid_epoch))[0], got)
    assert meta["epoch_num"] == 2 and meta["step_num"] == 12 and set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(demo_data, float_run, tmp_path, monkeypatch):
    """The loss of the 8th step (epoch 1, step 1) turns NaN, as after a diverging update."""
    real_make_train_cell = trainer.make_train_cell

    class DivergingTrainCell(nn.Cell):
        def __init__(self, cell):
            super().__init__(auto_prefix=False)  # saved with the real cell's Parameter names
            self.cell, self.calls = cell, 0

        def __call__(self, images, labels):
            loss, overflow, scale = self.cell(images, labels)
            self.calls += 1
            return (Tensor(float("nan")) if self.calls == 8 else loss), overflow, scale

    monkeypatch.setattr(trainer, "make_train_cell", lambda *args: DivergingTrainCell(real_make_train_cell(*args)))
    out = str(tmp_path / "nan")
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, step 1: training stopped. The last good "
                                            r"checkpoint is .*mobilenetV2_float-1_6.ckpt"):
        trainer.train(tiny_config(start_epoch=0, epoch_size=3, save_checkpoint_path=out), demo_data[0],
                      quantized=False, pretrained=float_run)
    assert os.listdir(out) == ["mobilenetV2_float-1_6.ckpt"]
    assert checkpoint.read(os.path.join(out, "mobilenetV2_float-1_6.ckpt"))[1]["epoch_num"] == 1


def test_ptq_calibrates_without_training(demo_data, float_run, tmp_path, capsys):
    """--mode ptq: observers over N training batches, BN in inference mode, no weight update; a quantized
    checkpoint with rounding on and ranges frozen, named by train.py's last line."""
    import train as train_script
    out = str(tmp_path / "ptq")
    path = train_script.main(["--mode", "ptq", "--pre_trained", float_run, "--dataset_path", demo_data[0],
                              *tiny_argv(), "--calibration_batches", "4", "--save_checkpoint_path", out])
    log = capsys.readouterr().out
    assert f"last checkpoint: {path}" in log and "calibrated on 4 batches (32 images)" in log
    params, meta = checkpoint_arrays(path)
    start, _ = checkpoint_arrays(float_run)
    assert meta["network_kind"] == "quant"
    assert params["input_quant.observer.batches_seen"] == 4 and params["input_quant.observer.enabled"] == 0
    assert params["input_quant.quant_enabled"] == 1 and params["features.0.bn_frozen"] == 1
    assert params["classifier.output_quant.observer.min_val"] < params["classifier.output_quant.observer.max_val"]
    network_names = set(start) & set(params)  # the float checkpoint also holds the optimizer's state
    assert {"features.0.weight", "features.0.moving_mean", "classifier.weight"} <= network_names
    for name in network_names:  # weights and BN statistics exactly as the float checkpoint left them
        np.testing.assert_array_equal(params[name], start[name], err_msg=name)

    with pytest.raises(SystemExit, match="--mode ptq calibrates the float checkpoint --pre_trained"):
        train_script.main(["--mode", "ptq", "--dataset_path", demo_data[0], *tiny_argv()])
    with pytest.raises(SystemExit, match="has 48 images for this rank, fewer than one batch of 64: lower "
                                         "--batch_size"):
        train_script.main(["--mode", "ptq", "--pre_trained", float_run, "--dataset_path", demo_data[0],
                           *tiny_argv(batch_size=64), "--save_checkpoint_path", out])
    with pytest.raises(SystemExit, match="--mode ptq calibrates a float checkpoint; .* holds a quant network"):
        train_script.main(["--mode", "ptq", "--pre_trained", path, "--dataset_path", demo_data[0], *tiny_argv(),
                           "--save_checkpoint_path", out])


def test_plot_draws_the_curves_of_a_training_log(qat_run, tmp_path, monkeypatch):
    import plot as plot_script
    _, log = qat_run
    log_path = tmp_path / "train.log"
    log_path.write_text(log)
    training, validation = read_curves(log)
    # the figures are the log's own: each epoch's average loss, the lr of its last step, the validation lines
    assert training["epoch"] == [1, 2] and validation["epoch"] == [1, 2]
    assert training["loss"] == [float(x) for x in re.findall(r"avg loss: ([\d.]+),", log)]
    assert training["lr"] == [float(x) for x in re.findall(r"step:\[    5/    6\].*lr:\[([\d.]+)\]", log)]
    assert validation["top1"] == [float(x) for x in re.findall(r"val acc: ([\d.]+)", log)]
    png = plot_script.main([str(log_path), "--output", str(tmp_path / "curves.png")])
    with open(png, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (800, 900)
    empty = tmp_path / "empty.log"
    empty.write_text("nothing\n")
    with pytest.raises(SystemExit, match="no epoch lines in the log"):
        plot_script.main([str(empty)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="plot.py needs matplotlib, which is not installed: pip install matplotlib"):
        plot_script.main([str(log_path)])


def test_sensitivity_report_measures_each_tensor_alone(demo_data, qat_run, tmp_path, capsys):
    import analyze
    from src.dataset import Epoch, create_dataset
    from src.evaluation import network_predictor
    from src.quant.layers import set_integer_inference
    from src.sensitivity import quantizers
    _, val_path = demo_data
    last, _ = qat_run
    report, chart = tmp_path / "sensitivity.md", tmp_path / "sensitivity.png"
    # one batch of 8 images: 119 passes of the network (each tensor alone, plus float and all quantized) add up
    reference, everything, rows = analyze.main(["--checkpoint_path", last, "--dataset_path", val_path, *tiny_argv(),
                                                "--batches", "1", "--report", str(report), "--output", str(chart)])
    out = capsys.readouterr().out
    assert "weights at 7 bits, 8-bit activations" in out and "weakest: " in out and report.read_text() in out
    with open(chart, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1000, 1000)
    # the figures of two tensors, a weight and an activation, computed directly
    config = tiny_config()
    network, config = checkpoint.load_network(last, config)
    set_integer_inference(network, False)  # as analyze measures: fake quantization, tensor by tensor
    found = quantizers(network)
    # weights, conv and classifier outputs, residual sums, the input and the pooling
    assert len(rows) == len(found) == 26 + 26 + 2 + 2
    images, labels = next(iter(Epoch(create_dataset(val_path, False, config))))  # the first batch, as analyze's
    predict = network_predictor(network, config.batch_size)

    def logits_with_only(index):
        for i, (_, quantizer) in enumerate(found):
            quantizer.quant_enabled.set_data(ms.Tensor(1.0 if i == index else 0.0, ms.float32))
        return predict(images).astype(np.float64)

    float_logits = logits_with_only(None)
    assert reference["acc"] == np.mean(np.argmax(float_logits, 1) == labels)
    for index in (3, 4):  # features.1's depthwise weights and that layer's output
        logits = logits_with_only(index)
        assert rows[index]["kind"] == ("weights" if index == 3 else "activation")
        assert rows[index]["acc"] == np.mean(np.argmax(logits, 1) == labels)
        noise = np.sum((logits - float_logits) ** 2)
        assert rows[index]["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(float_logits ** 2) / noise), rel=1e-6)
    # All tensors quantized cost more than a typical one alone. Not more than every one: the noise of several
    # tensors can partly cancel, and on this network (at about chance) the worst single tensor measured 15.17 dB
    # against 15.46 for all of them.
    assert everything["sqnr_db"] < np.median([row["sqnr_db"] for row in rows])


def test_a_step_whose_gradients_overflow_is_skipped():
    """The loss-scaled step's overflow check: an inf or a NaN in one element of one gradient skips the update of
    every Parameter; finite gradients are applied."""
    class SumOfDense(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = nn.Dense(3, 1)

        def construct(self, x):
            return self.dense(x).sum()

    net = SumOfDense()
    cell = trainer.TrainOneStepWithLossScale(net, nn.SGD(net.trainable_params(), 0.1),
                                             nn.FixedLossScaleUpdateCell(1024.0))
    start = [p.asnumpy().copy() for p in net.trainable_params()]
    for bad in (np.inf, np.nan):  # the weight's gradient is x; the bias's stays finite
        _, overflow, _ = cell(Tensor(np.array([[1.0, bad, 1.0]], np.float32)))
        assert overflow
        for param, value in zip(net.trainable_params(), start):
            np.testing.assert_array_equal(param.asnumpy(), value, err_msg=param.name)
    _, overflow, _ = cell(Tensor(np.array([[1.0, 2.0, 3.0]], np.float32)))
    assert not overflow
    assert all(not np.array_equal(p.asnumpy(), value) for p, value in zip(net.trainable_params(), start))
