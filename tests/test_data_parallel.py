"""Data parallel on this machine's CPU: 2 worker processes started by msrun (src/launch.py) on loopback."""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dp_worker.py")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_each_other_and_one_process_on_the_global_batch(float_checkpoint, tmp_path):
    out = str(tmp_path)
    subprocess.run([sys.executable, WORKER, "--out", out, "--single", "--pre_trained", float_checkpoint],
                   check=True, capture_output=True)
    launched = subprocess.run([sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2",
                               "--master_port", str(_free_port()), "--log_dir", os.path.join(out, "log"), WORKER,
                               "--out", out, "--pre_trained", float_checkpoint], capture_output=True, text=True)
    assert launched.returncode == 0, launched.stdout[-3000:]
    single, rank0, rank1 = (np.load(os.path.join(out, f"{name}.npz")) for name in ("single", "rank0", "rank1"))
    start = np.load(os.path.join(out, "start.npz"))
    # training moved the weights and the ranges
    assert not np.array_equal(start["classifier.weight"], single["classifier.weight"])
    assert not np.array_equal(start["pool_quant.observer.max_val"], single["pool_quant.observer.max_val"])
    for name in single.files:
        # every rank holds the same weights, activation ranges included (each saw only half the batch)
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        # and they equal one process that saw the whole batch, to float summation order
        np.testing.assert_allclose(rank0[name], single[name], rtol=1e-4, atol=1e-6, err_msg=name)
