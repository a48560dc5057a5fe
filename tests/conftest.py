import os
import sys

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A tiny copy of the demo dataset: 4 classes, 16x16 pixels."""
    from src.demo_data import generate
    root = tmp_path_factory.mktemp("demo")
    train, val = generate(str(root), train_per_class=12, val_per_class=6, image_size=20, seed=3)
    return train, val
