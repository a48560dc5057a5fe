"""Export of a trained quantized checkpoint: MINDIR reloads bit-exactly, ONNX is a real INT8 model that ONNX
Runtime runs on integer kernels and that gives the checkpoint's own logits, and so does the int8 .tflite model on
LiteRT's XNNPACK kernels; wrong requests fail clearly."""
import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import eval as eval_script
import export as export_script
from conftest import tiny_argv


@pytest.fixture(scope="module")
def exported(qat_run, tmp_path_factory):
    checkpoint_path, _ = qat_run
    out = tmp_path_factory.mktemp("export")
    paths = {fmt: export_script.main(["--ckpt_file", checkpoint_path, "--file_format", fmt,
                                      "--file_name", str(out / "tiny"), *tiny_argv()])
             for fmt in ("ONNX", "MINDIR", "TFLITE")}
    return checkpoint_path, paths


@pytest.mark.xdist_group("export")
def test_onnx_is_an_integer_model_onnx_runtime_runs_on_integer_kernels(exported, tmp_path):
    _, paths = exported
    model = onnx.load(paths["ONNX"])
    onnx.checker.check_model(model, full_check=True)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    # 25 convolutions (TINY's depth) and the classifier as a 1x1 one; every residual add (2 at this width and
    # depth: the first block has one when its 32 * 0.25 input channels round to its 8 output channels)
    assert ops["Conv"] == 26 and ops["Add"] == 2 and ops["QuantizeLinear"] == 26 + 2 + 2  # + input, pooling
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    conv_weights = [w for name, w in weights.items() if name.endswith(tuple(f"_w_{i}" for i in range(10 ** 4)))
                    and w.ndim == 4]
    assert len(conv_weights) == 26 and all(w.dtype == np.int8 and np.abs(w).max() <= 63 for w in conv_weights)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(paths["ONNX"], options, providers=["CPUExecutionProvider"])
    fused = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused["QLinearConv"] == 26 and fused["QLinearAdd"] == 2 and fused["QLinearGlobalAveragePool"] == 1
    assert fused["Conv"] == 0 and fused["Add"] == 0


@pytest.mark.xdist_group("export")
def test_deployed_models_agree_with_the_checkpoint_exactly(exported, demo_data, capsys):
    checkpoint_path, paths = exported
    _, val_path = demo_data
    integer = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", checkpoint_path, *tiny_argv()])
    mindir = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", paths["MINDIR"], *tiny_argv()])
    assert mindir == integer  # the same graph, reloaded
    deployed = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", paths["ONNX"], *tiny_argv()])
    assert deployed == integer and deployed["images"] == 24
    result = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", checkpoint_path,
                               "--parity_with", paths["ONNX"], *tiny_argv()])
    out = capsys.readouterr().out
    assert "(integer inference) |" in out and "top-1 agreement: 100.00%" in out
    # The checkpoint's integer inference computes what ONNX Runtime computes: identical logits, image for image.
    assert result["max_logit_diff_steps"] == 0 and result["top1_agreement"] == 1
    # Fake quantization in float (--simulated) is what training computes; with each bias rounded as the deployed
    # one, it computes the deployed model too, up to float summation order.
    simulated = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", checkpoint_path, "--simulated",
                                  "--parity_with", paths["ONNX"], *tiny_argv()])
    assert "(simulated) |" in capsys.readouterr().out
    assert simulated["top1_agreement"] >= 23 / 24 and simulated["max_logit_diff_steps"] <= 2


@pytest.mark.xdist_group("export")
def test_tflite_model_runs_on_xnnpack_and_gives_the_checkpoint_logits(exported, demo_data, capsys):
    """The checkpoint's integer inference as LiteRT computes (its ADD and QUANTIZE differ from ONNX Runtime's) and
    the .tflite model in LiteRT's interpreter: identical logits, image for image; every operator on XNNPACK."""
    from ai_edge_litert.interpreter import Interpreter
    from src.targets.litert_run import fully_delegated
    checkpoint_path, paths = exported
    _, val_path = demo_data
    interpreter = Interpreter(model_path=paths["TFLITE"])
    interpreter.allocate_tensors()
    ops = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())
    assert ops["CONV_2D"] + ops["DEPTHWISE_CONV_2D"] == 25 and ops["FULLY_CONNECTED"] == 1 and ops["ADD"] == 2
    assert ops["MEAN"] == 1 and fully_delegated(interpreter)
    result = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", checkpoint_path,
                               "--parity_with", paths["TFLITE"], *tiny_argv()])
    assert "integer inference as LiteRT (XNNPACK) computes" in capsys.readouterr().out
    assert result["max_logit_diff_steps"] == 0 and result["top1_agreement"] == 1
    deployed = eval_script.main(["--dataset_path", val_path, "--checkpoint_path", paths["TFLITE"], *tiny_argv()])
    assert deployed["acc"] == result["acc_b"] and deployed["images"] == 24


@pytest.mark.xdist_group("export")
def test_onnx_model_is_evaluated_at_the_size_it_takes(exported, demo_data):
    _, paths = exported
    _, val_path = demo_data
    unsized = tiny_argv(without=("image_height", "image_width"))
    assert (eval_script.main(["--dataset_path", val_path, "--checkpoint_path", paths["ONNX"], *unsized]) ==
            eval_script.main(["--dataset_path", val_path, "--checkpoint_path", paths["ONNX"], *tiny_argv()]))
    with pytest.raises(SystemExit, match="tiny.onnx takes 16x16 images, the data pipeline gives 24x24: give "
                                         "--image_height 16 --image_width 16"):
        eval_script.main(["--dataset_path", val_path, "--checkpoint_path", paths["ONNX"],
                          *tiny_argv(image_height=24, image_width=24)])


@pytest.mark.xdist_group("export")
def test_wrong_export_requests_fail_clearly(exported, float_run, tmp_path):
    """AIR off Ascend, the wrong kind of checkpoint, an unreadable exported model."""
    checkpoint_path, _ = exported
    with pytest.raises(SystemExit, match="AIR export needs the Ascend backend .* export MINDIR .* or ONNX"):
        export_script.main(["--ckpt_file", checkpoint_path, "--file_format", "AIR", "--file_name",
                            str(tmp_path / "m"), *tiny_argv()])
    with pytest.raises(SystemExit, match="--network quant given, but .* holds a float network"):
        export_script.main(["--ckpt_file", float_run, "--file_format", "ONNX", "--file_name", str(tmp_path / "m"),
                            *tiny_argv()])
    with pytest.raises(SystemExit, match="TFLITE export writes int8 models of quantized networks; this checkpoint "
                                         "holds a float network"):
        export_script.main(["--ckpt_file", float_run, "--file_format", "TFLITE", "--network", "float",
                            "--file_name", str(tmp_path / "m"), *tiny_argv()])
    assert not os.listdir(tmp_path)
    with pytest.raises(SystemExit, match="--simulated evaluates a quantized checkpoint; .* holds a float network"):
        eval_script.main(["--dataset_path", "unused", "--checkpoint_path", float_run, "--simulated", *tiny_argv()])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(SystemExit, match="cannot load exported model .*broken.onnx"):
        eval_script.main(["--dataset_path", "unused", "--checkpoint_path", str(broken), *tiny_argv()])
