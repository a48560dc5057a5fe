"""ImageNet-layout datasets (one folder per class) through mindspore.dataset."""
import os
import re

import mindspore as ms
import numpy as np
import mindspore.dataset as ds
import mindspore.dataset.vision as vision
import mindspore.dataset.transforms as transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class DatasetError(ValueError):
    pass


def input_record(config):
    """What a checkpoint records about the input its network was trained on: size, and normalisation of 0-255
    pixels (mean and std per RGB channel)."""
    return {"image_height": config.image_height, "image_width": config.image_width, "input_mean": MEAN,
            "input_std": STD}


def check_input_record(config, record, source, given=None, log=print):
    """Match config's input to what `source` (a checkpoint or an exported model) says it was trained on: `record`,
    its metadata (older checkpoints have none of these keys, and load as before).

    The size keys not in `given` (config keys the user set; None: all of them) are taken from the record, and a
    size that still differs is said, not refused: another size may be a deliberate choice. Another normalisation
    than this pipeline's is an error: no option here would make the inputs what the network expects.
    """
    if "input_mean" in record and not (np.allclose(record["input_mean"], MEAN) and
                                       np.allclose(record["input_std"], STD)):
        raise DatasetError(f"{source} was trained on inputs normalised with mean {record['input_mean']} and std "
                           f"{record['input_std']}; this pipeline normalises with mean {MEAN} and std {STD}")
    if "image_height" not in record:
        return
    trained = (int(record["image_height"]), int(record["image_width"]))
    for key, value in zip(("image_height", "image_width"), trained):
        if given is not None and key not in given:
            config[key] = value
    used = (config.image_height, config.image_width)
    if used != trained:
        log(f"warning: {source} was trained on {trained[0]}x{trained[1]} images; using {used[0]}x{used[1]} as "
            f"--image_height/--image_width ask")
    elif given is not None and not {"image_height", "image_width"} <= set(given):
        log(f"input size {used[0]}x{used[1]}, as {source} was trained")


def list_classes(dataset_path):
    """Sorted class folder names under dataset_path, each holding at least one image; errors name the path."""
    if not os.path.isdir(dataset_path):
        raise DatasetError(f"dataset folder not found: {dataset_path}")
    classes = sorted(e.name for e in os.scandir(dataset_path) if e.is_dir())
    if not classes:
        raise DatasetError(f"no class folders in {dataset_path}: expected the ImageNet layout, "
                           f"{dataset_path}/<class>/<image>.JPEG")
    for name in classes:
        folder = os.path.join(dataset_path, name)
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder)):
            raise DatasetError(f"class folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return classes


def create_dataset(dataset_path, do_train, config, rank=0, group_size=1, epoch=0):
    """Batched (image CHW float32, label int32) pipeline over every image of dataset_path.

    Training: random-resized crop, horizontal flip, shuffled. Evaluation: resize, centre crop, in order. The
    last partial batch is kept: evaluation scores every image, training drops it itself (one batch shape, and
    an exact count of skipped images). Iterate with `Epoch`. Randomness is seeded from config.seed and `epoch`, so an epoch's
    order and augmentation are the same however the run got there (resume relies on it).
    Sharded by rank for data parallel.
    """
    classes = list_classes(dataset_path)
    if len(classes) != config.num_classes:
        raise DatasetError(f"{dataset_path} has {len(classes)} class folders but num_classes is "
                           f"{config.num_classes}")
    ds.config.set_seed(config.seed + epoch)
    ds.config.set_error_samples_mode(ds.config.ErrorSamplesMode.SKIP if config.skip_bad_images
                                     else ds.config.ErrorSamplesMode.RETURN)
    extensions = [e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())]
    data = ds.ImageFolderDataset(dataset_path, shuffle=do_train, extensions=extensions,
                                 class_indexing={name: i for i, name in enumerate(classes)},
                                 num_shards=group_size if group_size > 1 else None,
                                 shard_id=rank if group_size > 1 else None,
                                 num_parallel_workers=config.num_parallel_workers)
    size = (config.image_height, config.image_width)
    if do_train:
        image_ops = [vision.RandomCropDecodeResize(size, scale=(config.crop_min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
                     vision.RandomHorizontalFlip(prob=0.5)]
    else:
        resize = [int(round(s / config.eval_resize_ratio)) for s in size]
        image_ops = [vision.Decode(), vision.Resize(resize), vision.CenterCrop(size)]
    image_ops += [vision.Normalize(mean=MEAN, std=STD), vision.HWC2CHW()]
    data = data.map(operations=image_ops, input_columns="image", num_parallel_workers=config.num_parallel_workers)
    data = data.map(operations=transforms.TypeCast(ms.int32), input_columns="label",
                    num_parallel_workers=config.num_parallel_workers)
    num_images = data.get_dataset_size()
    data = data.batch(config.batch_size, drop_remainder=False)
    data.num_images = num_images  # in this shard
    data.source_path = dataset_path
    return data


class Epoch:
    """One pass over a dataset from create_dataset: yields (images, labels) NumPy batches, turns a decode
    failure into an error naming the file, and counts the images seen (so skipped ones can be reported)."""

    def __init__(self, data):
        self.data = data
        self.images_seen = 0

    def __iter__(self):
        try:
            for images, labels in self.data.create_tuple_iterator(num_epochs=1, output_numpy=True):
                self.images_seen += len(labels)
                yield images, labels
        except RuntimeError as err:
            found = re.search(r"data file is: (.+?)\. ", str(err))
            where = found.group(1) if found else self.data.source_path
            raise DatasetError(f"cannot read image {where}: corrupt or not an image "
                               f"(--skip_bad_images True skips such files)") from None

    @property
    def images_skipped(self):
        return self.data.num_images - self.images_seen


def full_batches(epoch, batch_size, limit=None):
    """(images, labels) of the first `limit` (None: all) full batches of `epoch` (an Epoch): one input shape, one
    compiled graph."""
    taken = 0
    for images, labels in epoch:
        if taken == limit:
            return
        if len(labels) == batch_size:
            taken += 1
            yield images, labels
