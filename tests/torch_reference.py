"""The PyTorch side of the weight-import tests, run in a process of its own (torch and MindSpore each bring an
OpenMP runtime): builds torchvision's or timm's own MobileNetV2, gives it weights, saves them as .pth and
.safetensors, and writes its logits on given inputs.

    python tests/torch_reference.py --library torchvision --widths 0.35 --num_classes 10 --inputs x.npy --out DIR
Writes DIR/<width>/weights.pth, weights.safetensors and (with --inputs) logits.npy for each width.
Weights: random, with BN statistics of a few batches and random BN affine parameters (so a swapped name
shows), or with --train_dir trained on an ImageNet-layout folder (a stand-in for public ImageNet weights).
"""
import argparse
import os

import numpy as np
import torch
from safetensors.torch import save_file

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_WIDTHS = {0.35: "035", 0.5: "050", 0.75: "075", 1.0: "100", 1.4: "140"}


def build(library, width, num_classes):
    if library == "torchvision":
        import torchvision
        return torchvision.models.mobilenet_v2(width_mult=width, num_classes=num_classes)
    import timm
    return timm.create_model(f"mobilenetv2_{TIMM_WIDTHS[width]}", num_classes=num_classes)


def randomise(model, image_size, seed):
    """BN statistics averaged over a few batches (momentum None: a plain mean), random BN affine parameters
    and classifier bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
            elif isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.5, generator=generator)
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, image_size, image_size, generator=generator))


def train(model, folder, image_size, epochs, lr, seed):
    import torchvision
    from torchvision import transforms
    torch.manual_seed(seed)
    augment = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0)),
                                  transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                  transforms.Normalize(MEAN, STD)])
    data = torchvision.datasets.ImageFolder(folder, augment)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss_fn(model(images), labels).backward()
            optimizer.step()
            schedule.step()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", choices=("torchvision", "timm"), required=True)
    parser.add_argument("--widths", type=float, nargs="+", required=True)
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--inputs", default=None, help=".npy of NCHW inputs to write the logits of")
    parser.add_argument("--train_dir", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for width in args.widths:
        torch.manual_seed(args.seed)
        model = build(args.library, width, args.num_classes)
        if args.train_dir:
            train(model, args.train_dir, args.image_size, args.epochs, args.lr, args.seed)
        else:
            randomise(model, args.image_size, args.seed)
        model.eval()
        out = os.path.join(args.out, f"{width:g}")
        os.makedirs(out, exist_ok=True)
        state = model.state_dict()
        torch.save(state, os.path.join(out, "weights.pth"))
        save_file({name: value.contiguous() for name, value in state.items()}, os.path.join(out, "weights.safetensors"))
        if args.inputs:
            with torch.no_grad():
                logits = model(torch.from_numpy(np.load(args.inputs)))
            np.save(os.path.join(out, "logits.npy"), logits.numpy())


if __name__ == "__main__":
    main()
