"""Top-1 / top-5 over every image of a dataset, for any model given as a function from images to logits."""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from src.dataset import DatasetError, Epoch


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
    count = _images_scored(epoch)
    result = {"acc": top1 / count, "top5": top5 / count, "images": count}
    if epoch.images_skipped:
        result["skipped"] = epoch.images_skipped
    return result


def _images_scored(epoch):
    if epoch.images_seen == 0:
        raise DatasetError(f"no image could be read from {epoch.data.source_path}")
    return epoch.images_seen


def onnx_predictor(path):
    """Images -> logits through ONNX Runtime on CPU (its QDQ fusion runs an INT8 model on integer kernels).
    The function's `input_record` gives the image size the model takes (src.dataset.check_input_record)."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    size = tuple(model_input.shape[2:])

    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None

    def predict(images):
        if images.shape[2:] != size:
            raise DatasetError(f"{path} takes {size[0]}x{size[1]} images, the data pipeline gives "
                               f"{images.shape[2]}x{images.shape[3]}: give --image_height {size[0]} "
                               f"--image_width {size[1]}")
        if fixed_batch is None:
            return session.run(None, {model_input.name: images})[0]
        # A model exported for a fixed batch size: chunks of it, the last one padded with zeros.
        count = len(images)
        padded = np.concatenate([images, np.zeros((-count % fixed_batch,) + images.shape[1:], images.dtype)])
        return np.concatenate([session.run(None, {model_input.name: padded[i:i + fixed_batch]})[0]
                               for i in range(0, len(padded), fixed_batch)])[:count]
    predict.input_record = {"image_height": size[0], "image_width": size[1]}
    return predict


def mindir_predictor(path):
    """Images -> logits through a MINDIR graph (exported with a dynamic batch size) loaded back into MindSpore."""
    graph = ms.nn.GraphCell(ms.load(path))
    return lambda images: graph(Tensor(images, ms.float32)).asnumpy()


def parity(predict_a, predict_b, data, output_step):
    """Run two models side by side over `data`: top-1 of each, the share of images whose top-1 agree, and the
    largest logit difference in units of `output_step` (the output quantization step)."""
    correct_a = correct_b = agree = 0
    largest = 0.0
    epoch = Epoch(data)
    for images, labels in epoch:
        a, b = predict_a(images), predict_b(images)
        top_a, top_b = a.argmax(1), b.argmax(1)
        correct_a += int(np.sum(top_a == labels))
        correct_b += int(np.sum(top_b == labels))
        agree += int(np.sum(top_a == top_b))
        largest = max(largest, float(np.abs(a - b).max()) / output_step)
    count = _images_scored(epoch)
    return {"acc_a": correct_a / count, "acc_b": correct_b / count, "top1_agreement": agree / count,
            "max_logit_diff_steps": largest, "images": count}
