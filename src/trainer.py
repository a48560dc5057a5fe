"""The training loop, shared by float training and QAT: one place where steps, schedule, logging,
checkpoints and resume happen."""
import glob
import math
import os
import re

import mindspore as ms
from mindspore import nn, ops, Tensor

from src import checkpoint
from src.dataset import check_input_record, create_dataset, Epoch, full_batches, input_record
from src.evaluation import evaluate, network_predictor
from src.layers import set_compute_dtype
from src.lr_generator import get_lr
from src.mobilenetV2 import network_from_config
from src.quant.layers import OscillationDampening, quant_state_names
from src.quant.quantizer import QuantConfig
from src.quant.schedule import QuantSchedule, calibrate_ranges, reestimate_bn_statistics
from src.utils import CrossEntropySmooth, Monitor

NO_DECAY_SUFFIXES = ("gamma", "beta", "bias", "step_size")


class TrainingError(RuntimeError):
    pass


def make_optimizer(network, lr, config):
    """Momentum with weight decay on conv and dense weights only (not on BN parameters, biases and step sizes)."""
    params = network.trainable_params()
    decay = [p for p in params if not p.name.endswith(NO_DECAY_SUFFIXES)]
    no_decay = [p for p in params if p.name.endswith(NO_DECAY_SUFFIXES)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return nn.Momentum(groups, learning_rate=Tensor(lr), momentum=config.momentum)


class TrainOneStepWithLossScale(nn.TrainOneStepWithLossScaleCell):
    """MindSpore's loss-scaled training step with an overflow check that works on every target: the stock one
    uses float-status primitives (Ascend registers, FloatStatus) that have no CPU kernel."""

    def get_overflow_status(self, status, compute_output):
        overflow = ops.logical_not(ms.amp.all_finite(compute_output)).astype(ms.float32)
        if self.is_distributed:
            overflow = self.allreduce(overflow)  # one rank's overflow skips the step on all of them
        return overflow > 0


class LossWithPenalty(nn.Cell):
    """A loss cell's loss plus a penalty that depends on Parameters only (no input)."""

    def __init__(self, loss_cell, penalty):
        super().__init__(auto_prefix=False)
        self.loss_cell, self.penalty = loss_cell, penalty

    def construct(self, images, labels):
        return self.loss_cell(images, labels) + self.penalty()


def make_loss_cell(network, config):
    """The network followed by the training loss (label-smoothed cross entropy), plus oscillation dampening when
    a quantized network's config asks for it."""
    loss_cell = nn.WithLossCell(network, CrossEntropySmooth(config.num_classes, config.label_smooth))
    if network.quantized and config.oscillation_dampening:
        return LossWithPenalty(loss_cell, OscillationDampening(network, config.oscillation_dampening))
    return loss_cell


def make_train_cell(network, optimizer, config):
    """Forward, loss, scaled backward and update in one graph. The loss scale multiplies the loss before
    backward and divides the gradients after it, so small FP16 gradients do not underflow; a step whose
    gradients overflow is skipped. "dynamic" halves the scale on overflow and doubles it after 1000 clean steps."""
    loss_net = make_loss_cell(network, config)
    if config.loss_scale_type == "dynamic":
        scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=config.loss_scale, scale_factor=2, scale_window=1000)
    else:
        scale = nn.FixedLossScaleUpdateCell(loss_scale_value=config.loss_scale)
    cell = TrainOneStepWithLossScale(loss_net, optimizer, scale_sense=scale)
    cell.set_train(True)
    return cell


def quant_schedule(config, steps_per_epoch):
    return QuantSchedule(quant_delay=config.quant_delay_epochs * steps_per_epoch,
                         freeze_bn=config.freeze_bn_epochs * steps_per_epoch,
                         freeze_observer=config.freeze_observer_epochs * steps_per_epoch)


def checkpoint_prefix(quantized):
    return "mobilenetV2_quant" if quantized else "mobilenetV2_float"


def _checkpoint_position(path):
    """(epoch, step in that epoch) from a name <prefix>-<epoch>_<step>.ckpt, epoch counted from 1 as the log's."""
    found = re.search(r"-(\d+)_(\d+)\.ckpt$", path)
    return (int(found.group(1)), int(found.group(2))) if found else None


def list_checkpoints(directory, quantized):
    """This run's checkpoints in `directory` (epoch ends and mid-epoch ones), oldest first."""
    paths = glob.glob(os.path.join(directory, f"{checkpoint_prefix(quantized)}-*_*.ckpt"))
    return sorted((p for p in paths if _checkpoint_position(p)), key=_checkpoint_position)


def _check_resume(path, config, kind, schedule_steps, log):
    """What makes a resume not the same run, named before anything is loaded."""
    entries, meta = checkpoint.read(path, only=("learning_rate",))
    if meta.get("network_kind", kind) != kind:
        raise TrainingError(f"--resume {path} holds a {meta['network_kind']} network, this run trains a {kind} one")
    for key in [key for key in QuantConfig.RECORDED if key != "layer_weight_bits"] + ["image_height", "image_width"]:
        if key in meta and meta[key] != config[key]:
            raise TrainingError(f"--resume {path} was trained with {key} {meta[key]}, this run asks for "
                                f"{config[key]}: give --{key} {meta[key]}")
    if meta.get("layer_weight_bits", {}) != config.layer_weight_bits:
        raise TrainingError(f"--resume {path} was trained with the layer bit widths "
                            f"{meta.get('layer_weight_bits', {})}, this run asks for {dict(config.layer_weight_bits)}: "
                            f"give --bits_plan with the plan it was trained with (or none)")
    check_input_record(config, meta, path, log=log)
    saved = entries.get("learning_rate")
    if saved is not None and saved.shape[0] != schedule_steps:
        raise TrainingError(f"--resume {path} follows a learning-rate schedule of {saved.shape[0]} steps, this run "
                            f"one of {schedule_steps}: resume with the run's --epoch_size, --start_epoch, "
                            f"--batch_size and dataset")


def _build_network(config, quantized, sync_group=None):
    network = network_from_config(config, quantized, sync_group)
    set_compute_dtype(network, getattr(ms, config.compute_dtype))
    return network


def _count_full_batches(data, config):
    """Full batches in `data` (a training pipeline): the partial last one is dropped, one shape, one graph."""
    count = data.num_images // config.batch_size
    if count == 0:
        raise TrainingError(f"{data.source_path} has {data.num_images} images for this rank, fewer than one batch "
                            f"of {config.batch_size}: lower --batch_size")
    return count


def _reestimate_bn(network, train_cell, dataset_path, config, rank, group_size, epoch, log):
    """BN statistics re-estimated over the first config.bn_reestimation_batches batches of this epoch's training
    data (its order and augmentation are seeded by the epoch: a resumed run sees the same images)."""
    data = Epoch(create_dataset(dataset_path, True, config, rank, group_size, epoch=epoch))
    seen = reestimate_bn_statistics(network, (images for images, _ in full_batches(
        data, config.batch_size, config.bn_reestimation_batches)))
    train_cell.set_train(True)
    log(f"BN statistics re-estimated over {seen} batches before BN freezes")


class _Checkpoints:
    """Where a run writes: epoch-end and mid-epoch checkpoints of the whole training cell (the newest
    config.keep_checkpoint_max kept), and with validation the best network as <prefix>-best.ckpt."""

    def __init__(self, config, output_dir, quantized, train_cell, network, rank, log):
        self.config, self.output_dir, self.quantized, self.log = config, output_dir, quantized, log
        self.train_cell, self.network = train_cell, network
        self.saving = rank == 0 and config.save_checkpoint
        self.best_path = os.path.join(output_dir, f"{checkpoint_prefix(quantized)}-best.ckpt")
        self.best_acc = -1.0
        self.last = None  # the last checkpoint written or resumed from: what a failure names

    def resumed(self, path):
        """Continue after `path`, keeping the best checkpoint of the epochs before it unless this run beats it."""
        self.last = path
        if os.path.isfile(self.best_path):
            self.best_acc = checkpoint.read(self.best_path, only=())[1].get("val_acc", -1.0)

    def save(self, epoch_num, step, name):
        if not self.saving:
            return
        path = os.path.join(self.output_dir, f"{checkpoint_prefix(self.quantized)}-{name}.ckpt")
        checkpoint.save(self.train_cell, path, self.network, epoch_num, step, input_record(self.config))
        for old in list_checkpoints(self.output_dir, self.quantized)[:-self.config.keep_checkpoint_max]:
            os.remove(old)
        self.log(f"checkpoint saved: {path}")  # src/launch.py names the newest when a rank fails
        self.last = path

    def keep_if_best(self, acc, epoch_num, step):
        if self.config.save_checkpoint and acc > self.best_acc:
            self.best_acc = acc
            checkpoint.save(self.network, self.best_path, self.network, epoch_num, step,
                            dict(input_record(self.config), val_acc=acc))
            self.log(f"best val acc so far: {self.best_path}")


def _start(network, train_cell, checkpoints, config, quantized, pretrained, resume, reinit_classifier,
           schedule_steps, log):
    """Load what the run starts from: a resumed run's whole training state, or the pre-trained network's
    weights. Returns (first epoch, global step)."""
    if resume:
        if resume == "latest":
            found = list_checkpoints(checkpoints.output_dir, quantized)
            if not found:
                raise TrainingError(f"--resume latest: no {checkpoint_prefix(quantized)} checkpoint in "
                                    f"{checkpoints.output_dir}")
            resume = found[-1]
        _check_resume(resume, config, checkpoint.network_kind(network), schedule_steps, log)
        meta = checkpoint.load_into(network, resume, train_state=train_cell)
        checkpoints.resumed(resume)
        log(f"resumed from {resume}: epoch {meta['epoch_num']}, global step {meta['step_num']}")
        return meta["epoch_num"], meta["step_num"]
    if pretrained:
        allow = quant_state_names(network) if quantized else ()
        meta = checkpoint.load_into(network, pretrained, allow_missing=allow, reinit_classifier=reinit_classifier,
                                    log=log)
        log(f"loaded {meta['network_kind']} checkpoint {pretrained}")
        check_input_record(config, meta, pretrained, log=log)
    elif quantized:
        log("warning: QAT from random initialisation; pass --pre_trained with a float checkpoint")
    return 0, 0


def train_one_epoch(train_cell, network, epoch_data, epoch, step, skip, lr, schedule, monitor, checkpoints,
                    reestimate_bn):
    """One epoch's steps from global step `step`, passing over its first `skip` batches (a resumed mid-epoch
    checkpoint trained on them): the schedule's switches (after BN re-estimation, `reestimate_bn()`, where BN
    freezes), the step, its log line, the NaN guard and mid-epoch checkpoints. Returns the global step after it."""
    config = checkpoints.config
    for i, (images, labels) in enumerate(epoch_data):
        if len(labels) < config.batch_size or i < skip:
            continue  # the partial last batch (one input shape, one compiled graph); batches already trained on
        if schedule is not None:
            if step == schedule.freeze_bn and config.bn_reestimation_batches:
                reestimate_bn()
            schedule.apply(network, step)
        monitor.step_begin()
        loss, _, _ = train_cell(Tensor(images), Tensor(labels))
        loss = float(loss.asnumpy())
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at epoch {epoch}, step {i}: training stopped. The last good "
                                f"checkpoint is {checkpoints.last or 'none (none written yet)'}; lower --lr or "
                                f"check the data and the pre-trained checkpoint")
        monitor.step_end(epoch, i, loss, float(lr[min(step, len(lr) - 1)]))
        step += 1
        if config.save_checkpoint_steps and step % config.save_checkpoint_steps == 0 \
                and i + 1 < monitor.steps_per_epoch:  # at an epoch's end the epoch checkpoint follows
            checkpoints.save(epoch, step, f"{epoch + 1}_{i + 1}")
    return step


def train(config, dataset_path, quantized=True, pretrained=None, resume=None, reinit_classifier=False,
          output_dir=None, rank=0, group_size=1, sync_group=None, eval_dataset_path=None, log=print, progress=None):
    """Train for config.epoch_size epochs (float, or QAT from the float checkpoint `pretrained`).

    resume: a checkpoint this function wrote ("latest" picks the newest in output_dir); training continues
    exactly where it stood. eval_dataset_path: validate every config.eval_interval epochs, as the deployed model
    computes (inference mode), and keep the best network as <prefix>-best.ckpt. progress: a terminal stream for a
    progress bar in place of the per-step lines. Returns the path of the last checkpoint written or resumed from
    (None if there is none).
    """
    output_dir = output_dir or config.save_checkpoint_path
    ms.set_seed(config.seed)
    network = _build_network(config, quantized, sync_group)
    steps_per_epoch = _count_full_batches(create_dataset(dataset_path, True, config, rank, group_size), config)
    lr = get_lr(config.start_epoch * steps_per_epoch, 0.0, config.lr_end, config.lr, config.warmup_epochs,
                config.start_epoch + config.epoch_size, steps_per_epoch)
    train_cell = make_train_cell(network, make_optimizer(network, lr, config), config)
    checkpoints = _Checkpoints(config, output_dir, quantized, train_cell, network, rank, log)
    first_epoch, step = _start(network, train_cell, checkpoints, config, quantized, pretrained, resume,
                               reinit_classifier, len(lr), log)
    # A checkpoint written in the middle of an epoch: that epoch's first batches are already trained on. Its data
    # order and augmentation are seeded by the epoch, so passing over them leaves the rest exactly as they were.
    skip = step - first_epoch * steps_per_epoch

    log(f"lr: this run sees {lr[0]:.6f} at its first step down to {lr[-1]:.6f} at its last: the tail, from epoch "
        f"{config.start_epoch}, of a {config.start_epoch + config.epoch_size}-epoch warm-up + cosine schedule "
        f"peaking at {config.lr}")
    schedule = quant_schedule(config, steps_per_epoch) if quantized else None
    if quantized:
        for message in schedule.warnings(config.quantizer):
            log(f"warning: {message}")
    monitor = Monitor(config.epoch_size, steps_per_epoch, config.batch_size * group_size, config.log_interval, log,
                      progress)
    validation = create_dataset(eval_dataset_path, False, config) if eval_dataset_path and rank == 0 else None
    os.makedirs(output_dir, exist_ok=True)

    for epoch in range(first_epoch, config.epoch_size):
        epoch_data = Epoch(create_dataset(dataset_path, True, config, rank, group_size, epoch=epoch))
        monitor.epoch_begin()
        step = train_one_epoch(train_cell, network, epoch_data, epoch, step, skip, lr, schedule, monitor,
                               checkpoints, lambda: _reestimate_bn(network, train_cell, dataset_path, config, rank,
                                                                   group_size, epoch, log))
        skip = 0
        monitor.epoch_end(epoch)
        if epoch_data.images_skipped:
            log(f"skipped {epoch_data.images_skipped} unreadable images in epoch {epoch}")
        done = epoch + 1
        if done % config.save_checkpoint_epochs == 0 or done == config.epoch_size:
            checkpoints.save(done, step, f"{done}_{steps_per_epoch}")
        if validation is not None and (done % config.eval_interval == 0 or done == config.epoch_size):
            result = evaluate(network_predictor(network, config.batch_size), validation)
            train_cell.set_train(True)  # the predictor put the network in inference mode
            log(f"epoch: {done}, val acc: {result['acc']:.4f}, top5: {result['top5']:.4f}")
            checkpoints.keep_if_best(result["acc"], done, step)
    return checkpoints.last


def calibrate(config, dataset_path, pretrained, output_dir=None, log=print):
    """Post-training quantization, the baseline QAT has to beat: the quantized network from the float checkpoint
    `pretrained`, its observers run over config.calibration_batches training batches (the training pipeline's
    shuffled, augmented images) with BN in inference mode, nothing rounded and no weight update; then rounding on
    and every range frozen. Returns the path of the quantized checkpoint written."""
    output_dir = output_dir or config.save_checkpoint_path
    network = _build_network(config, quantized=True)
    meta = checkpoint.load_into(network, pretrained, allow_missing=quant_state_names(network))
    if meta["network_kind"] != checkpoint.FLOAT:
        raise TrainingError(f"--mode ptq calibrates a float checkpoint; {pretrained} holds a {meta['network_kind']} "
                            f"network")
    log(f"loaded float checkpoint {pretrained}")
    check_input_record(config, meta, pretrained, log=log)
    data = create_dataset(dataset_path, True, config)
    batches = min(_count_full_batches(data, config), config.calibration_batches)
    if batches < config.calibration_batches:
        log(f"{dataset_path} holds only {batches} full batches of {config.batch_size}: calibrating on all of them "
            f"(--calibration_batches {config.calibration_batches} asked for more)")
    done = calibrate_ranges(network, (x for x, _ in full_batches(Epoch(data), config.batch_size, batches)))
    log(f"calibrated on {done} batches ({done * config.batch_size} images)")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{checkpoint_prefix(True)}_ptq-{done}.ckpt")
    checkpoint.save(network, path, network, 0, 0, input_record(config))
    return path
