"""Bad input ends in a clear error naming the problem: dataset folders, image files, config overrides."""
import io
import os
import shutil

import pytest
from easydict import EasyDict

from src.config import config_cpu, parse_args
from src.dataset import DatasetError, Epoch, create_dataset
from src.lr_generator import get_lr

pytestmark = pytest.mark.quick  # the developer's loop: python -m pytest -q -m quick tests

CONFIG = EasyDict(dict(config_cpu, num_classes=4, image_height=16, image_width=16, batch_size=5,
                       num_parallel_workers=1))


def test_missing_empty_and_unstructured_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match=f"dataset folder not found: {tmp_path}/nope"):
        create_dataset(str(tmp_path / "nope"), True, CONFIG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=f"no class folders in {empty}"):
        create_dataset(str(empty), True, CONFIG)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.JPEG").write_bytes(b"x")
    with pytest.raises(DatasetError, match=f"no class folders in {flat}: expected the ImageNet layout"):
        create_dataset(str(flat), True, CONFIG)
    (flat / "cls").mkdir()
    (flat / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"class folder {flat}/cls holds no image"):
        create_dataset(str(flat), True, CONFIG)


def test_class_count_must_match_the_config(demo_data):
    with pytest.raises(DatasetError, match="has 4 class folders but num_classes is 7"):
        create_dataset(demo_data[1], False, EasyDict(dict(CONFIG, num_classes=7)))


@pytest.fixture
def corrupt_copy(demo_data, tmp_path):
    root = tmp_path / "val"
    shutil.copytree(demo_data[1], root)
    bad = root / sorted(os.listdir(root))[1] / "00002.JPEG"
    bad.write_bytes(b"this is not a JPEG")
    (root / sorted(os.listdir(root))[0] / "README.txt").write_text("ignored: not an image extension")
    return str(root), str(bad)


def test_corrupt_image_is_named(corrupt_copy):
    root, bad = corrupt_copy
    with pytest.raises(DatasetError, match=f"cannot read image {bad}: corrupt or not an image"):
        for _ in Epoch(create_dataset(root, False, CONFIG)):
            pass


def test_corrupt_images_can_be_skipped_and_are_counted(corrupt_copy):
    root, _ = corrupt_copy
    epoch = Epoch(create_dataset(root, False, EasyDict(dict(CONFIG, skip_bad_images=True))))
    batches = [len(labels) for _, labels in epoch]
    assert sum(batches) == 23 and epoch.images_seen == 23 and epoch.images_skipped == 1
    assert batches[-1] == 3  # evaluation keeps the partial last batch


def test_eval_pipeline_shapes_and_order(demo_data):
    batches = list(Epoch(create_dataset(demo_data[1], False, CONFIG)))
    images, labels = batches[0]
    assert images.shape == (5, 3, 16, 16) and images.dtype.name == "float32"
    assert [int(l) for _, ls in batches for l in ls] == sorted(int(l) for _, ls in batches for l in ls)


def _parse_with(add_args, argv, capsys):
    with pytest.raises(SystemExit):
        parse_args("test", add_args, argv)
    return capsys.readouterr().err


def _parse(argv, capsys):
    return _parse_with(lambda parser: None, argv, capsys)


def test_config_overrides_are_typed_and_checked(capsys):
    args, config = parse_args("test", lambda parser: None, ["--lr", "0.05", "--batch_size", "7",
                                                             "--skip_bad_images", "true", "--device_target", "GPU"])
    assert config.lr == 0.05 and config.batch_size == 7 and config.skip_bad_images is True
    assert args.device_target == "GPU" and config.num_classes == 1000
    assert "unrecognized arguments: --learning_rate" in _parse(["--learning_rate", "0.1"], capsys)
    assert "argument --batch_size: invalid int value: 'big'" in _parse(["--batch_size", "big"], capsys)
    assert "argument --save_checkpoint: invalid bool value: 'maybe'" in _parse(["--save_checkpoint", "maybe"], capsys)
    assert "--loss_scale_type must be 'fixed' or 'dynamic'" in _parse(["--loss_scale_type", "auto"], capsys)
    assert "--weight_bits must be between 2 and 8, got 9" in _parse(["--weight_bits", "9"], capsys)
    assert "--quantizer must be one of minmax, lsq, got 'LSQ'" in _parse(["--quantizer", "LSQ"], capsys)
    assert "--depth_mult must be positive, got 0.0" in _parse(["--depth_mult", "0"], capsys)
    assert "--oscillation_dampening must not be negative, got -0.001" in _parse(["--oscillation_dampening", "-0.001"],
                                                                                capsys)
    assert "ambiguous" not in _parse(["--save_checkpoint_pat", "x"], capsys)  # no silent abbreviations


def test_run_distribute_takes_exactly_what_the_other_yes_no_options_take(capsys):
    import train as train_script

    def run_distribute(value):
        return parse_args("test", train_script.add_args, ["--dataset_path", "d", "--run_distribute", value])[0]

    assert run_distribute("True").run_distribute is True and run_distribute("1").run_distribute is True
    assert run_distribute("no").run_distribute is False
    assert "argument --run_distribute: invalid bool value: 'Ture'" in _parse_with(train_script.add_args,
                                                                               ["--dataset_path", "d",
                                                                                "--run_distribute", "Ture"], capsys)


def test_lr_schedule_warms_up_then_decays_and_qat_takes_its_tail():
    full = get_lr(0, 0.0, 0.0, 0.3, 1, 4, 10)
    assert len(full) == 40 and full[9] == pytest.approx(0.3) and full[0] == pytest.approx(0.03)
    assert all(a >= b for a, b in zip(full[10:], full[11:])) and full[-1] < 1e-3
    tail = get_lr(30, 0.0, 0.0, 0.3, 1, 4, 10)
    assert len(tail) == 10 and (tail == full[30:]).all()


class _Clock:
    now = 0.0

    def time(self):
        return self.now


def test_epoch_lines_give_speed_and_time_left_and_a_terminal_gets_a_progress_bar(monkeypatch):
    from src import utils
    clock = _Clock()
    monkeypatch.setattr(utils, "time", clock)
    lines, terminal = [], io.StringIO()
    for progress in (None, terminal):
        clock.now = 0.0
        monitor = utils.Monitor(epoch_size=3, steps_per_epoch=4, images_per_step=8, log=lines.append,
                                progress=progress)
        monitor.epoch_begin()
        for step in range(4):
            monitor.step_begin()
            clock.now += 2.5
            monitor.step_end(0, step, 1.0 + step, 0.1)
        monitor.epoch_end(0)
    # redirected: the original per-step lines, then the epoch line: 32 images in 10 s, 2 more epochs of 10 s
    assert lines[0] == "epoch: [  0/  3], step:[    0/    4], loss:[1.000/1.000], time:[2500.000], lr:[0.100000]"
    assert lines[4] == ("epoch time: 10000.000, per step time: 2500.000, avg loss: 2.500, 3.2 img/s, "
                        "time left: 0:00:20")
    # on a terminal: a bar redrawn in place instead of the per-step lines; the epoch line as before
    assert lines[5:] == lines[4:5]
    assert terminal.getvalue().count("\r") == 4 and f"[{'#' * 30}] 4/4 loss 4.000, 3.2 img/s" in terminal.getvalue()
