"""Public weights: torchvision's and timm's own MobileNetV2s, saved as .pth and .safetensors, imported, and run
against the PyTorch models themselves; fine-tuning from imported weights onto other classes; the whole chain
import -> float fine-tuning -> PTQ -> QAT -> INT8 ONNX, each evaluated.

The PyTorch side runs in a process of its own (tests/torch_reference.py). No weights are downloaded: the
"public" networks are built here, random or trained on generated images.
"""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from easydict import EasyDict as ed
from mindspore import Tensor

import export as export_script
import import_weights as import_script
import train as train_script
from src import checkpoint
from src.config import config_cpu
from src.dataset import Epoch, create_dataset
from src.demo_data import generate, make_image
from src.import_weights import convert, read_state_dict

from conftest import Forward, evaluate_learned, learned_argv, ROOT

REFERENCE = os.path.join(ROOT, "tests", "torch_reference.py")
PARITY_WIDTH, PARITY_CLASSES, PARITY_SIZE = 0.35, 10, 64


def run_reference(out, *args):
    done = subprocess.run([sys.executable, REFERENCE, "--out", str(out), *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{REFERENCE} failed:\n{done.stderr[-3000:]}")
    return str(out)


@pytest.fixture(scope="module")
def parity_inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    rng = np.random.default_rng(11)
    np.save(path, rng.normal(0, 1, (4, 3, PARITY_SIZE, PARITY_SIZE)).astype(np.float32))
    return str(path)


@pytest.fixture(scope="module", params=["torchvision", "timm"])
def reference(request, parity_inputs, tmp_path_factory):
    """(library, folder with weights.pth, weights.safetensors and logits.npy) of a random PyTorch MobileNetV2."""
    out = run_reference(tmp_path_factory.mktemp(request.param), "--library", request.param, "--widths",
                        str(PARITY_WIDTH), "--num_classes", str(PARITY_CLASSES), "--image_size", str(PARITY_SIZE),
                        "--inputs", parity_inputs)
    return request.param, os.path.join(out, f"{PARITY_WIDTH:g}")


@pytest.mark.xdist_group("import_reference")
def test_imported_network_computes_the_pytorch_logits(reference, parity_inputs, tmp_path):
    library, folder = reference
    written = []
    for extension in ("pth", "safetensors"):
        written.append(import_script.main(["--input", os.path.join(folder, f"weights.{extension}"),
                                           "--output", str(tmp_path / f"{extension}.ckpt")]))
    (pth_params, meta), (st_params, _) = (checkpoint.read(path) for path in written)
    assert meta["network_kind"] == checkpoint.FLOAT
    assert (meta["num_classes"], meta["width_mult"]) == (PARITY_CLASSES, pytest.approx(PARITY_WIDTH))
    assert sorted(pth_params) == sorted(st_params)
    for name in pth_params:
        np.testing.assert_array_equal(pth_params[name].asnumpy(), st_params[name].asnumpy(), err_msg=name)

    # the network eval.py builds from the checkpoint, in GRAPH mode on the CPU kernels
    network, _ = checkpoint.load_network(written[1], config_cpu)
    forward = Forward(network)
    forward.set_train(False)
    ours = forward(Tensor(np.load(parity_inputs))).asnumpy()
    theirs = np.load(os.path.join(folder, "logits.npy"))
    logit_range = theirs.max() - theirs.min()
    difference = np.abs(ours - theirs).max()
    print(f"{library}: max |ours - PyTorch| {difference:.3g}, logit range {logit_range:.3g}")
    assert logit_range > 1.0  # logits that vary: a network whose signal vanished would match anything
    assert difference <= 1e-4 * logit_range
    # and it is the network that was given: the top class of each input agrees
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))


@pytest.mark.xdist_group("import_reference")
def test_imported_network_exports_to_onnx_with_the_pytorch_logits(reference, parity_inputs, tmp_path):
    """export.py takes an imported checkpoint like one train.py wrote: FP32 ONNX in ONNX Runtime, same logits
    (exported for batches of 3, run on 4 images: two chunks, the last padded)."""
    from src.evaluation import onnx_predictor
    library, folder = reference
    imported = import_script.main(["--input", os.path.join(folder, "weights.safetensors"),
                                   "--output", str(tmp_path / "imported.ckpt")])
    model = export_script.main(["--ckpt_file", imported, "--network", "float", "--file_format", "ONNX",
                                "--image_height", str(PARITY_SIZE), "--image_width", str(PARITY_SIZE),
                                "--export_batch_size", "3", "--file_name", str(tmp_path / "float")])
    deployed = onnx_predictor(model)(np.load(parity_inputs))
    theirs = np.load(os.path.join(folder, "logits.npy"))
    assert np.abs(deployed - theirs).max() <= 1e-4 * (theirs.max() - theirs.min()), library


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_every_published_width_imports(library, tmp_path):
    widths = ("0.5", "0.75", "1.0", "1.4")
    out = run_reference(tmp_path, "--library", library, "--widths", *widths, "--num_classes", "1000")
    for width in widths:
        network, layout = convert(read_state_dict(os.path.join(out, f"{float(width):g}", "weights.safetensors")))
        assert layout == library
        assert (network.width_mult, network.num_classes) == (pytest.approx(float(width)), 1000)


def _save_safetensors(state, path):
    from safetensors.numpy import save_file
    save_file(state, path)
    return path


@pytest.mark.xdist_group("import_reference")
def test_what_does_not_fit_is_named_and_nothing_is_written(reference, tmp_path):
    library, folder = reference
    state = read_state_dict(os.path.join(folder, "weights.safetensors"))
    output = str(tmp_path / "out.ckpt")

    def refused(path, match):
        with pytest.raises(SystemExit) as stopped:
            import_script.main(["--input", path, "--output", output])
        assert match in str(stopped.value), stopped.value
        assert not os.path.exists(output)

    some_bn = next(name for name in state if name.endswith("running_var"))
    refused(_save_safetensors({k: v for k, v in state.items() if k != some_bn}, str(tmp_path / "missing.safetensors")),
            f"missing (1): {some_bn}")
    extra = dict(state, **{"extra_head.weight": np.zeros((3, 3), np.float32)})
    refused(_save_safetensors(extra, str(tmp_path / "extra.safetensors")), "unexpected (1): extra_head.weight")
    conv = next(name for name in state if state[name].ndim == 4 and state[name].shape[1] > 1)
    squeezed = dict(state, **{conv: state[conv][:, :-1]})
    refused(_save_safetensors(squeezed, str(tmp_path / "shape.safetensors")), f"wrong shape (1): {conv}")
    other = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "fc.weight": np.zeros((10, 512), np.float32)}
    refused(_save_safetensors(other, str(tmp_path / "resnet.safetensors")), "is not a MobileNetV2 state dict")
    refused(str(tmp_path / "absent.pth"), "weights file not found")
    (tmp_path / "model.onnx").write_bytes(b"x")
    refused(str(tmp_path / "model.onnx"), "expected a .safetensors or .pth/.pt/.bin file")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    refused(str(tmp_path / "corrupt.safetensors"), "cannot read")
    # an existing output is never replaced
    with open(output, "wb") as f:
        f.write(b"precious")
    with pytest.raises(SystemExit, match="exists"):
        import_script.main(["--input", os.path.join(folder, "weights.safetensors"), "--output", output])
    assert open(output, "rb").read() == b"precious"


@pytest.mark.xdist_group("import_reference")
def test_pth_without_torch_names_the_missing_package(reference, tmp_path):
    _, folder = reference
    code = ("import sys; sys.modules['torch'] = None; import import_weights; "
            f"import_weights.main(['--input', {os.path.join(folder, 'weights.pth')!r}, "
            f"'--output', {str(tmp_path / 'x.ckpt')!r}])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "needs PyTorch ('torch')" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "x.ckpt").exists()


def test_pipeline_normalises_input_as_the_public_networks_expect(tmp_path):
    """Our evaluation pipeline's input for an image equals torchvision's ToTensor + Normalize with the mean and std
    its weights and timm's name (at the image's own size: no resize, no crop; a PNG: no decoder differences)."""
    import timm
    from torchvision import transforms
    from torchvision.models import MobileNet_V2_Weights
    folder = tmp_path / "data" / "class0"
    folder.mkdir(parents=True)
    image = make_image(3, 0, 24, seed=0)
    image.save(folder / "image.png")
    config = ed(dict(config_cpu, num_classes=1, image_height=24, image_width=24, eval_resize_ratio=1.0, batch_size=1,
                     num_parallel_workers=1))
    ours = next(iter(Epoch(create_dataset(str(tmp_path / "data"), False, config))))[0][0]
    expected = [(tuple(w.transforms().mean), tuple(w.transforms().std)) for w in MobileNet_V2_Weights]
    timm_config = timm.create_model("mobilenetv2_035").pretrained_cfg
    expected.append((tuple(timm_config["mean"]), tuple(timm_config["std"])))
    for mean, std in expected:
        theirs = transforms.Normalize(mean, std)(transforms.ToTensor()(image)).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


# Fine-tuning: a torchvision MobileNetV2 trained in PyTorch on other generated images (the 10 demo classes, 800
# images of another seed; 95% top-1 on its own validation images) stands in for public ImageNet weights. Float
# fine-tuning from it onto learning_data's 4 classes, 3 epochs at lr 0.01, is compared with conftest's
# learned_float, trained from scratch on them for 25 epochs (at depth 0.3: 98.3-100% over seeds 1-3 on the AVX2
# AMD EPYC). Measured (AVX-512 machine, both at full depth): 100% fine-tuned vs 97.9% from scratch; after 2, 3
# and 5 fine-tuning epochs 97.1-100%. From torchvision's random initialisation, imported the same way, the same
# 2-5 epochs reach 30-53%: the margin below (5 points) allows for the spread of such short runs and fails when the
# imported weights carry nothing.
FINE_TUNE_EPOCHS = 3
# The imported networks are torchvision's, of MobileNetV2's full depth; the rest of LEARNED as learned_float.
IMPORTED_ARGV = learned_argv(depth_mult=1.0)


@pytest.fixture(scope="module")
def imported_pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    train_dir, _ = generate(str(root / "data"), train_per_class=80, val_per_class=1, image_size=36, seed=5)
    out = run_reference(root / "torch", "--library", "torchvision", "--widths", "0.25", "--num_classes", "10",
                        "--image_size", "32", "--train_dir", train_dir, "--epochs", "20", "--lr", "0.02")
    return import_script.main(["--input", os.path.join(out, "0.25", "weights.pth"),
                               "--output", str(root / "imported.ckpt")])


@pytest.fixture(scope="module")
def fine_tuned(imported_pretrained, learning_data, tmp_path_factory):
    """(checkpoint, log, top-1) of float fine-tuning from the imported network onto learning_data's classes."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        last = train_script.main(["--mode", "float", "--pre_trained", imported_pretrained, "--reinit_classifier",
                                  "True", "--dataset_path", learning_data[0], *IMPORTED_ARGV, "--start_epoch", "0",
                                  "--epoch_size", str(FINE_TUNE_EPOCHS), "--lr", "0.01", "--keep_checkpoint_max", "1",
                                  "--save_checkpoint_path", str(tmp_path_factory.mktemp("fine_tuned"))])
    return last, log.getvalue(), evaluate_learned(last, learning_data[1], *IMPORTED_ARGV)["acc"]


@pytest.mark.xdist_group("import_fine_tuned")
def test_fine_tuning_from_imported_weights_needs_fewer_epochs(fine_tuned, learned_float, learning_data):
    _, log, fine_tuned_acc = fine_tuned
    assert "re-initialising the classifier (checkpoint shape differs: classifier.weight (10, 1280) vs (4, 1280)" in log
    scratch_acc = evaluate_learned(learned_float, learning_data[1])["acc"]
    print(f"fine-tuned {FINE_TUNE_EPOCHS} epochs from imported weights: {fine_tuned_acc:.4f}; "
          f"from scratch, 25 epochs: {scratch_acc:.4f}")
    assert fine_tuned_acc >= scratch_acc - 0.05


@pytest.mark.xdist_group("import_fine_tuned")
def test_import_ptq_qat_onnx_chain(fine_tuned, learning_data, tmp_path):
    fine_tuned, _, fine_tuned_acc = fine_tuned
    train_path, val_path = learning_data
    ptq = train_script.main(["--mode", "ptq", "--pre_trained", fine_tuned, "--dataset_path", train_path,
                             *IMPORTED_ARGV, "--calibration_batches", "10", "--save_checkpoint_path",
                             str(tmp_path / "ptq")])
    qat = train_script.main(["--pre_trained", fine_tuned, "--dataset_path", train_path, *IMPORTED_ARGV,
                             "--start_epoch", "0", "--epoch_size", "2", "--lr", "0.002", "--freeze_bn_epochs", "1",
                             "--freeze_observer_epochs", "1", "--save_checkpoint_path", str(tmp_path / "qat")])
    onnx_model = export_script.main(["--ckpt_file", qat, "--file_format", "ONNX", *IMPORTED_ARGV,
                                     "--file_name", str(tmp_path / "int8")])
    accuracy = {"float": fine_tuned_acc, "ptq": evaluate_learned(ptq, val_path, *IMPORTED_ARGV)["acc"]}
    # the parity run evaluates both the QAT checkpoint and the ONNX model: their accuracies come from it
    parity = evaluate_learned(qat, val_path, "--parity_with", onnx_model, *IMPORTED_ARGV)
    accuracy.update(qat=parity["acc_a"], onnx=parity["acc_b"])
    print({name: round(acc, 4) for name, acc in accuracy.items()}, parity)
    for name in ("ptq", "qat", "onnx"):
        assert accuracy[name] >= accuracy["float"] - 0.05, name
    assert parity["top1_agreement"] == 1 and parity["max_logit_diff_steps"] == 0
