"""Top-1 / top-5 over every image of a dataset, for any model given as a function from images to logits."""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from src.dataset import Epoch


def network_predictor(network, batch_size):
    """A NumPy images -> logits function over a MindSpore network in inference mode. A short last batch is
    padded to `batch_size` so the graph compiled for full batches serves it too."""
    network.set_train(False)

    def predict(images):
        count = len(images)
        if count < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
        return network(Tensor(images, ms.float32)).asnumpy()[:count]
    return predict


def evaluate(predict, data):
    """{'acc': top-1, 'top5': top-5, 'images': count} of `predict` over the dataset `data` (create_dataset)."""
    top1 = top5 = 0
    epoch = Epoch(data)
    for images, labels in epoch:
        logits = predict(images)
        ranked = np.argsort(-logits, axis=1)[:, :5]
        top1 += int(np.sum(ranked[:, 0] == labels))
        top5 += int(np.sum(np.any(ranked == labels[:, None], axis=1)))
    count = epoch.images_seen
    if count == 0:
        raise ValueError(f"no image could be read from {data.source_path}")
    result = {"acc": top1 / count, "top5": top5 / count, "images": count}
    if epoch.images_skipped:
        result["skipped"] = epoch.images_skipped
    return result
