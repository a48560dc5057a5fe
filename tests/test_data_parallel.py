"""Data parallel on this machine's CPU through msrun (src/launch.py) on loopback: 2 ranks as two nodes of one
worker each (the multi-node launch), and 2 ranks on one node through run_train.sh."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import gradient_moved_all
from src.launch import threads_per_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dp_worker.py")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _second_machine(folder):
    """A Python whose msrun takes every address for another machine's, as msrun on node 1 of two machines does
    with node 0's: on one machine both msruns would take 127.0.0.1 for their own and each start a scheduler.
    A `python` (this one) with such an `msrun` beside it, which src/launch.py then uses."""
    folder.mkdir()
    python = folder / "python"
    python.symlink_to(sys.executable)
    msrun = folder / "msrun"
    msrun.write_text(f"#!{sys.executable}\nimport sys\nfrom mindspore.parallel.cluster.process_entity import _api\n"
                     "_api._is_local_ip = lambda address: False\n"
                     "from mindspore.parallel.cluster.run import main\nsys.exit(main())\n")
    msrun.chmod(0o755)
    return str(python)


@pytest.fixture(scope="module")
def dp_run(float_checkpoint, tmp_path_factory):
    """The worker's outputs: one process on the global batch, then 2 ranks launched as two nodes (two launches,
    node_rank 0 and 1, one local worker each, the master at node 0 on loopback; node 1 as on another machine)."""
    out = tmp_path_factory.mktemp("dp")
    subprocess.run([sys.executable, WORKER, "--out", str(out), "--single", "--pre_trained", float_checkpoint],
                   check=True, capture_output=True)
    port = str(_free_port())
    nodes = [subprocess.Popen([python, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2",
                               "--local_worker_num", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                               "--master_port", port, "--log_dir", str(out / f"log_node{node}"), WORKER,
                               "--out", str(out), "--pre_trained", float_checkpoint],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node, python in enumerate([sys.executable, _second_machine(out / "node1")])]
    for node, launched in enumerate(nodes):
        output, _ = launched.communicate(timeout=1200)
        assert launched.returncode == 0, f"node {node}: {output[-3000:]}"
    assert os.listdir(out / "log_node1") == ["worker_1.log"]  # node 1 ran its worker, and no scheduler
    return str(out)


def test_two_ranks_match_each_other_and_one_process_on_the_global_batch(dp_run):
    single, rank0, rank1 = (np.load(os.path.join(dp_run, f"{name}.npz")) for name in ("single", "rank0", "rank1"))
    start = np.load(os.path.join(dp_run, "start.npz"))
    # training moved the weights (gradients, not only weight decay) and the ranges
    assert gradient_moved_all(start, single)
    assert not np.array_equal(start["pool_quant.observer.max_val"], single["pool_quant.observer.max_val"])
    for name in single.files:
        # every rank holds the same weights, activation ranges included (each saw only half the batch)
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        # and they equal one process that saw the whole batch, to float summation order
        np.testing.assert_allclose(rank0[name], single[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_moving_bn_statistics_agree_across_ranks(dp_run):
    """BN not frozen: each rank normalises by its own half batch, and all move their running statistics by the
    mean of both halves' statistics (broken once: the update read the statistics before the kernel wrote them)."""
    single = np.load(os.path.join(dp_run, "single.npz"))
    rank0, rank1 = (np.load(os.path.join(dp_run, f"rank{rank}_bn_moving.npz")) for rank in (0, 1))
    assert not np.array_equal(rank0["features.0.moving_mean"], single["features.0.moving_mean"])  # they moved
    for name in rank0.files:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)


def test_run_train_script_on_two_cpu_workers_then_run_infer(demo_data, float_run, tmp_path):
    """The users' entry points: 2 CPU ranks through msrun, per-rank logs, rank 0's checkpoint, then inference."""
    train_path, val_path = demo_data
    from conftest import tiny_argv
    launched = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_train.sh"), "CPU", "2", train_path,
                               float_run, *tiny_argv(), "--start_epoch", "2", "--epoch_size", "1"],
                              cwd=tmp_path, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    logs = [(tmp_path / "train" / "log" / f"worker_{rank}.log").read_text() for rank in (0, 1)]
    threads = threads_per_worker(2) if "OMP_NUM_THREADS" not in os.environ else os.environ["OMP_NUM_THREADS"]
    for rank, log in enumerate(logs):  # each rank trains on its half: 24 images, 3 batches of 8
        assert "epoch: [  0/  1], step:[    2/    3], loss:[" in log
        assert f"rank {rank} of 2: {threads} CPU threads" in log  # its share of the cores
    assert "effective config:" in logs[0] and "effective config:" not in logs[1]
    checkpoints = os.listdir(tmp_path / "train" / "checkpoint")
    assert checkpoints == ["mobilenetV2_quant-1_3.ckpt"]
    inferred = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_infer_quant.sh"), "CPU", val_path,
                               str(tmp_path / "train" / "checkpoint" / checkpoints[0]), *tiny_argv()],
                              cwd=tmp_path, capture_output=True, text=True)
    assert inferred.returncode == 0, inferred.stdout + inferred.stderr
    assert inferred.stdout.startswith("result:{'acc': ") and "'images': 24" in inferred.stdout
    usage = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_train.sh"), "GPU", "zero", train_path],
                           cwd=tmp_path, capture_output=True, text=True)
    assert usage.returncode != 0 and "DEVICE_ID_LIST must look like 0,1,2,3" in usage.stdout
    assert "bash run_train.sh [GPU] [DEVICE_ID_LIST]" in usage.stdout
    half_given = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_train.sh"), "CPU", "1", train_path],
                                cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, NODE_NUM="2"))
    assert half_given.returncode != 0 and "NODE_NUM=2 needs NODE_RANK and MASTER_ADDR" in half_given.stdout


@pytest.mark.quick
@pytest.mark.parametrize("flags,message", [
    (["--local_worker_num", "3"], "--local_worker_num must be between 1 and --worker_num (2), got 3"),
    (["--local_worker_num", "1", "--node_rank", "2"],
     "--node_rank must be between 0 and 1 (2 workers, 1 on each node), got 2")])
def test_launch_refuses_a_node_layout_that_cannot_be(flags, message, tmp_path):
    script = tmp_path / "script.py"
    script.write_text("")
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2", *flags,
                              str(script)], capture_output=True, text=True)
    assert refused.returncode == 2 and message in refused.stderr


@pytest.mark.quick
def test_launch_finds_msrun_and_python_beside_the_interpreter_without_path(tmp_path):
    """A virtual environment's python run without activating it: msrun is beside it, not on PATH, and msrun starts
    each worker as `python` from PATH, which must then be this Python (the one with MindSpore)."""
    script = tmp_path / "who.py"
    script.write_text("import sys, mindspore\nprint('worker python', sys.executable)\n")
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no msrun, and a `python` (if any) without MindSpore
    launched = subprocess.run([sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "1",
                               "--master_port", str(_free_port()), "--log_dir", str(tmp_path / "log"), str(script)],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert launched.stdout.startswith(os.path.join(os.path.dirname(sys.executable), "msrun") + " ")
    assert f"worker python {sys.executable}" in (tmp_path / "log" / "worker_0.log").read_text()


@pytest.mark.quick
def test_each_worker_gets_its_share_of_the_cores():
    from src.launch import worker_environment
    assert [threads_per_worker(local, cores=8) for local in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert worker_environment(3)["OMP_NUM_THREADS"] == "3"
