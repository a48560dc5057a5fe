"""The network's dataflow, traced from its construct, links each layer to the quantizer of its input and is what
export writes: a network of the same quantized layers, defined in another order than its data flows, trains,
evaluates as integers and exports with nothing written for it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from easydict import EasyDict
from mindspore import nn, Tensor
from onnx import numpy_helper

from src.config import config_cpu
from src.export import export
from src.quant.dataflow import link_input_quantizers
from src.quant.layers import QuantLayers, weight_layers
from src.quant.quantizer import QuantConfig
from src.quant.schedule import QuantSchedule
from src.trainer import make_optimizer, make_train_cell

CLASSES, SIZE, BATCH = 3, 12, 8


class OutOfOrder(nn.Cell):
    """Input quantization, a stem, a residual block (expand, project, add), a head, pooling and a classifier,
    defined in none of that order: by definition order the head would take the input quantizer's output and the
    stem the add's."""

    def __init__(self, config):
        super().__init__()
        layers = QuantLayers(config)
        self.quantized, self.quant_config, self.num_classes = True, config, CLASSES
        self.input_quant = layers.edge_activation_quant()
        self.quantize_input = layers.quantize_input(self.input_quant)
        self.head = layers.conv_bn_act(8, 16, kernel_size=1)
        self.classifier = layers.dense(16, CLASSES)
        self.project = layers.conv_bn_act(16, 8, kernel_size=1, activation=False)
        self.pool_quant = layers.edge_activation_quant()
        self.pool = layers.global_average_pool(self.pool_quant)
        self.expand = layers.conv_bn_act(8, 16, kernel_size=3, groups=8)
        self.add = layers.add()
        self.stem = layers.conv_bn_act(3, 8, kernel_size=3, stride=2)
        link_input_quantizers(self)

    def construct(self, x):
        x = self.stem(self.quantize_input(x))
        x = self.add(x, self.project(self.expand(x)))
        return self.classifier(self.pool(self.head(x)))


def _batch(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (BATCH, 3, SIZE, SIZE)).astype(np.float32),
            rng.integers(0, CLASSES, BATCH).astype(np.int32))


def test_a_network_defined_out_of_order_trains_and_deploys_exactly(tmp_path):
    network = OutOfOrder(QuantConfig(weight_bits=7))  # 7: exact on AVX2-only CPUs too (README)
    names = {id(cell): name for name, cell in network.cells_and_names()}
    inputs = {name: names[id(layer.input_quantizer[0])] for name, layer in weight_layers(network).items()}
    assert inputs == {"head": "add.output_quant", "classifier": "pool_quant", "project": "expand.output_quant",
                      "expand": "stem.output_quant", "stem": "input_quant"}

    config = EasyDict(dict(config_cpu, num_classes=CLASSES))
    train_cell = make_train_cell(network, make_optimizer(network, np.full(8, 0.05, np.float32), config), config)
    train_cell.set_train(True)
    schedule = QuantSchedule(freeze_bn=2, freeze_observer=3)
    for step in range(5):
        schedule.apply(network, step)
        images, labels = _batch(step)
        assert np.isfinite(train_cell(Tensor(images), Tensor(labels))[0].asnumpy())

    path = export(network, str(tmp_path / "out_of_order"), "ONNX", BATCH, SIZE, SIZE, "CPU")
    model = onnx.load(path)
    network.set_train(False)
    images = np.concatenate([_batch(seed)[0] for seed in range(100, 104)])
    ours = np.concatenate([network(Tensor(images[i:i + BATCH])).asnumpy() for i in range(0, len(images), BATCH)])
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    step = network.classifier.output_quant.qparams()[0].asnumpy()
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    assert np.abs(ours - theirs).max() / step == 0
    assert np.ptp(ours) > 0  # logits, not one constant

    # Training adds the bias the deployed model adds: each layer's bias rounded at the scale of the tensor that
    # flows into it, as the ONNX model's int32 bias (bias codes * input scale * weight scale).
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {node.output[0]: node for node in model.graph.node}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == len(weight_layers(network))
    for conv in convs:
        layer = getattr(network, conv.name.split("_")[0])
        bias_dq = producers[conv.input[2]]
        deployed = tensors[bias_dq.input[0]] * tensors[bias_dq.input[1]]
        weight, bias = layer.float_weights()
        weight_scale = layer.weight_quant.observe(weight)[0]
        trained = layer.deployed_bias(bias, weight_scale).asnumpy()
        np.testing.assert_allclose(trained, deployed, rtol=1e-6, atol=0, err_msg=conv.name)


@pytest.mark.quick
def test_a_float_input_to_a_quantized_layer_is_refused():
    class Unquantized(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = QuantLayers(QuantConfig()).conv_bn_act(3, 8)
            link_input_quantizers(self)

        def construct(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="a quantized layer takes the network's float input"):
        Unquantized()
