"""End to end on a tiny demo dataset: float training, QAT from it, evaluation, exact resume, and the errors
users hit first (data, checkpoints, config)."""
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from easydict import EasyDict

import eval as eval_script
from mindspore import nn, Tensor

from src import checkpoint, trainer
from src.config import config_cpu
from src.dataset import MEAN, STD, DatasetError, check_input_record, input_record
from src.trainer import train, TrainingError

from conftest import TINY, gradient_moved_all, tiny_argv


def tiny_config(**overrides):
    return EasyDict(dict(config_cpu, **dict(TINY, **overrides)))


def _params(path):
    entries, meta = checkpoint.read(path)
    return {name: value.asnumpy() for name, value in entries.items()}, meta


def test_float_then_qat_then_eval_through_the_scripts(demo_data, float_run, qat_run, capsys):
    _, val_path = demo_data
    _, meta = checkpoint.read(float_run)
    assert meta["network_kind"] == "float" and meta["epoch_num"] == 2
    last, log = qat_run
    assert "effective config:" in log and "lr: this run sees" in log
    assert "epoch: [  1/  2], step:[    5/    6], loss:[" in log and "per step time:" in log
    assert os.listdir(os.path.dirname(last)) == [os.path.basename(last)]  # keep_checkpoint_max 1
    params, meta = _params(last)
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


def test_another_normalisation_is_refused():
    config = tiny_config()
    record = dict(input_record(config), input_mean=[127.5] * 3, input_std=[127.5] * 3)
    with pytest.raises(DatasetError, match="m.ckpt was trained on inputs normalised with mean \\[127.5"):
        check_input_record(config, record, "m.ckpt")


def test_resume_continues_exactly(demo_data, float_run, tmp_path):
    train_path, _ = demo_data
    config = dict(start_epoch=2, epoch_size=3, lr=0.05, freeze_bn_epochs=2, freeze_observer_epochs=2,
                  loss_scale_type="dynamic")
    straight = train(tiny_config(**config, save_checkpoint_path=str(tmp_path / "a")), train_path,
                     pretrained=float_run)
    # the same run killed after epoch 1 (of 3) leaves its first checkpoint; a new run resumes from it
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "a" / "mobilenetV2_quant-1_6.ckpt", resumed_dir)
    resumed = train(tiny_config(**config, save_checkpoint_path=str(resumed_dir)), train_path, resume="latest")
    want, _ = _params(straight)
    got, meta = _params(resumed)
    assert gradient_moved_all(_params(float_run)[0], want)
    assert meta["epoch_num"] == 3 and meta["step_num"] == 18
    assert set(want) == set(got)
    assert any(name.startswith("moments.") for name in got)  # the optimizer state is in the checkpoint
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
    params, meta = _params(path)
    start, _ = _params(float_run)
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
    with pytest.raises(SystemExit, match="--mode ptq calibrates a float checkpoint; .* holds a quant network"):
        train_script.main(["--mode", "ptq", "--pre_trained", path, "--dataset_path", demo_data[0], *tiny_argv(),
                           "--save_checkpoint_path", out])
