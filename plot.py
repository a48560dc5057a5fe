"""Draw a training run's curves (loss, learning rate, validation accuracy per epoch) from its log into a PNG.

    python train.py ... > train.log 2>&1; python plot.py train.log --output curves.png
Needs matplotlib (pip install matplotlib); training does not.
"""
import argparse
import os
import sys

from src.curves import LogError, draw, read_curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a train.py log (its output redirected to a file)")
    parser.add_argument("--output", default="curves.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("error: plot.py needs matplotlib, which is not installed: pip install matplotlib")
    if not os.path.isfile(args.log):
        sys.exit(f"error: log not found: {args.log}")
    with open(args.log, encoding="utf-8", errors="replace") as log:
        text = log.read()
    try:
        training, validation = read_curves(text)
    except LogError as err:
        sys.exit(f"error: {args.log}: {err}")
    path = draw(training, validation, args.output, title=os.path.basename(args.log))
    print(f"wrote {path}: {len(training['epoch'])} epochs, {len(validation['epoch'])} validations")
    return path


if __name__ == "__main__":
    main()
