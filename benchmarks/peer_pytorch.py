"""The peer for benchmark.py: PyTorch eager-mode QAT of the same MobileNetV2 (1.0, 224x224, 1000 classes) and
PyTorch's converted INT8 model, on the same cores. Prints one line "RESULT {json}".

PyTorch is not a dependency of this project; benchmark.py runs this file with the interpreter given by
--peer_python and skips it with a message when that interpreter has no torch. As torchvision's quantizable
MobileNetV2 does, it uses ReLU where the MindSpore model has ReLU6 (eager mode fuses Conv+BN+ReLU only).
"""
import argparse
import json
import resource
import time

import torch
from torch import nn
from torch.ao import quantization as tq

SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn(cin, cout, kernel, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=False)] if relu else []))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        blocks = ([conv_bn(cin, hidden, 1)] if expand != 1 else []) + [
            conv_bn(hidden, hidden, 3, stride, hidden), conv_bn(hidden, cout, 1, relu=False)]
        self.conv = nn.Sequential(*blocks)
        self.residual = stride == 1 and cin == cout
        self.add = nn.quantized.FloatFunctional()

    def forward(self, x):
        return self.add.add(x, self.conv(x)) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2)], 32
        for expand, cout, repeats, stride in SETTING:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()

    def forward(self, x):
        x = self.features(self.quant(x))
        return self.dequant(self.classifier(x.mean((2, 3))))

    def fuse(self):
        # collected first: the fused modules are Sequentials themselves
        targets = [m for m in self.modules() if type(m) is nn.Sequential and isinstance(m[0], nn.Conv2d)]
        for module in targets:
            tq.fuse_modules_qat(module, [[str(i) for i in range(len(module))]], inplace=True)


def rate(run, items, repeats):
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return items / sorted(times)[len(times) // 2]


def train_rate(model, images, labels, repeats):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
    model.train()
    return rate(step, len(images), repeats)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = torch.randn(args.batch_size, 3, 224, 224), torch.randint(0, 1000, (args.batch_size,))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    result["float_train_images_per_s"] = train_rate(MobileNetV2(), images, labels, args.repeats)
    model = MobileNetV2()
    model.train()
    model.fuse()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(model, inplace=True)
    result["qat_train_images_per_s"] = train_rate(model, images, labels, args.repeats)
    model.eval()
    int8 = tq.convert(model)
    with torch.no_grad():
        result["int8_infer_images_per_s"] = rate(lambda: int8(images), args.batch_size, args.repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
