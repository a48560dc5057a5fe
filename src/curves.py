"""Training curves from a train.py log: loss, learning rate and validation accuracy per epoch, drawn into a PNG."""
import re

STEP_LINE = re.compile(r"^epoch: \[\s*(\d+)/\s*\d+\], step:\[\s*\d+/\s*\d+\], loss:\[[^\]]*\], time:\[[^\]]*\], "
                       r"lr:\[([\d.eE+-]+)\]")
EPOCH_LINE = re.compile(r"^epoch time: [\d.]+, per step time: [\d.]+, avg loss: ([\d.naif]+)")
VALIDATION_LINE = re.compile(r"^epoch: (\d+), val acc: ([\d.]+), top5: ([\d.]+)")


class LogError(ValueError):
    pass


def read_curves(text):
    """{"epoch": [...], "loss": [...], "lr": [...]} per trained epoch (1-based, as the validation lines count) and
    {"epoch", "top1", "top5"} per validation, from a log's lines. An epoch logged twice (a resumed run appended
    to the same log) keeps its last figures."""
    trained, validated = {}, {}
    epoch = lr = None
    for line in text.splitlines():
        if (found := STEP_LINE.match(line)):
            epoch, lr = int(found.group(1)) + 1, float(found.group(2))
        elif (found := EPOCH_LINE.match(line)) and epoch is not None:
            trained[epoch] = (float(found.group(1)), lr)
        elif (found := VALIDATION_LINE.match(line)):
            validated[int(found.group(1))] = (float(found.group(2)), float(found.group(3)))
    if not trained:
        raise LogError("no epoch lines in the log (train.py's 'epoch: [..], step:[..]' and 'epoch time: ...' lines; "
                       "a log written to a terminal has a progress bar instead: redirect train.py's output)")
    epochs, runs = sorted(trained), sorted(validated)
    return ({"epoch": epochs, "loss": [trained[e][0] for e in epochs], "lr": [trained[e][1] for e in epochs]},
            {"epoch": runs, "top1": [validated[e][0] for e in runs], "top5": [validated[e][1] for e in runs]})


def draw(training, validation, path, title=""):
    """Loss, learning rate (at each epoch's last step) and, if any, validation top-1/top-5, one panel each, into
    a PNG of 800 x 900 pixels."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)
    panels = 3 if validation["epoch"] else 2
    figure, axes = plt.subplots(panels, 1, figsize=(8, 9), dpi=100, sharex=True)
    axes[0].plot(training["epoch"], training["loss"], marker="o")
    axes[0].set_ylabel("average training loss")
    axes[0].set_title(title)
    axes[1].plot(training["epoch"], training["lr"], marker="o", color="tab:orange")
    axes[1].set_ylabel("learning rate (last step)")
    if validation["epoch"]:
        axes[2].plot(validation["epoch"], [100 * a for a in validation["top1"]], marker="o", label="top-1")
        axes[2].plot(validation["epoch"], [100 * a for a in validation["top5"]], marker="s", label="top-5")
        axes[2].set_ylabel("validation accuracy (%)")
        axes[2].legend()
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
