"""The embedded demo dataset: small, deterministic, learnable images in the ImageNet folder layout.

Ten classes: five textures (horizontal, vertical and diagonal stripes, checkerboard, plain) in two colour
families (warm, cool), with random frequency, phase, hue, brightness and pixel noise. Every crop of an image
still shows its class, so the ImageNet training augmentation applies unchanged. Generated, never downloaded:
    python -m src.demo_data --output_path ./demo_data
"""
import argparse
import colorsys
import os

import numpy as np
from PIL import Image

TEXTURES = ("hstripes", "vstripes", "checker", "diagonal", "plain")
PALETTES = ("warm", "cool")
CLASS_NAMES = tuple(f"{t}_{p}" for t in TEXTURES for p in PALETTES)


def _texture(kind, size, rng):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq = rng.uniform(0.3, 0.6)  # periods of 10 to 20 pixels
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "hstripes":
        return np.sin(freq * yy + phase)
    if kind == "vstripes":
        return np.sin(freq * xx + phase)
    if kind == "checker":
        return np.sign(np.sin(freq * xx + phase) * np.sin(freq * yy + phase))
    if kind == "diagonal":  # either diagonal: a horizontal flip turns one into the other
        return np.sin(freq * (xx + rng.choice([-1, 1]) * yy) / np.sqrt(2) + phase)
    # plain: one colour, only the pixel noise added later
    return np.full((size, size), rng.uniform(0.5, 1.0), np.float32)


def _colour(palette, rng):
    hue = rng.uniform(-0.08, 0.12) % 1.0 if palette == "warm" else rng.uniform(0.45, 0.7)
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)), np.float32)


def make_image(label, index, size, seed):
    texture, palette = TEXTURES[label // len(PALETTES)], PALETTES[label % len(PALETTES)]
    rng = np.random.default_rng([seed, label, index])
    t = (_texture(texture, size, rng)[..., None] + 1.0) / 2.0
    fg, bg = _colour(palette, rng), _colour(palette, rng) * rng.uniform(0.1, 0.4)
    image = 255.0 * (t * fg + (1.0 - t) * bg) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def generate(output_path, train_per_class=80, val_per_class=30, image_size=64, seed=0, num_classes=len(CLASS_NAMES)):
    """Write output_path/{train,val}/<class>/<n>.JPEG for the first num_classes classes; returns the two
    folder paths."""
    splits = {"train": (train_per_class, 0), "val": (val_per_class, 1_000_000)}
    for split, (count, offset) in splits.items():
        for label, name in enumerate(CLASS_NAMES[:num_classes]):
            folder = os.path.join(output_path, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                make_image(label, offset + i, image_size, seed).save(os.path.join(folder, f"{i:05d}.JPEG"),
                                                                      quality=90)
    return os.path.join(output_path, "train"), os.path.join(output_path, "val")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_path", default="./demo_data")
    parser.add_argument("--train_per_class", type=int, default=80)
    parser.add_argument("--val_per_class", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, val = generate(args.output_path, args.train_per_class, args.val_per_class, args.image_size, args.seed)
    print(f"demo dataset written: {train}, {val}")


if __name__ == "__main__":
    main()
