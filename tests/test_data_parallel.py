"""Data parallel on this machine's CPU through msrun (src/launch.py) on loopback: 2 ranks as two nodes of one
worker each (the multi-node launch), and 2 ranks on one node through run_train.sh."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import gradient_moved_all
from src.launch import free_port, threads_per_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dp_worker.py")


# Seconds the ranks of a test's launch wait for each other: cluster formation takes a second or two here, so a
# broken launch fails within a minute, with its own error, instead of msrun's 600 s default.
CLUSTER_TIMEOUT = "30"


def _second_machine(folder):
    """A Python whose msrun takes every address for another machine's, as msrun on node 1 of two machines does
    with node 0's: on one machine both msruns would take 127.0.0.1 for their own and each start a scheduler.
    A `python` with such an `msrun` beside it, which src/launch.py then uses. The `python` is a script run by this
    Python, not a symlink to it: Python finds its environment (a venv's pyvenv.cfg) beside the path it was started
    from, so a symlink in another folder would run the base interpreter, without MindSpore."""
    folder.mkdir()
    python = folder / "python"
    python.write_text(
        f"#!{sys.executable}\n"
        "import os, runpy, sys\n"
        "if len(sys.argv) > 1 and not sys.argv[1].startswith('-'):  # python SCRIPT ARGS: run it as this python\n"
        "    sys.executable, sys.argv = os.path.abspath(__file__), sys.argv[1:]\n"
        "    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "else:\n"
        f"    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    python.chmod(0o755)
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
    port = str(free_port())
    nodes = [subprocess.Popen([python, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2",
                               "--local_worker_num", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                               "--master_port", port, "--cluster_timeout", CLUSTER_TIMEOUT, "--log_dir",
                               str(out / f"log_node{node}"), WORKER,
                               "--out", str(out), "--pre_trained", float_checkpoint],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node, python in enumerate([sys.executable, _second_machine(out / "node1")])]
    for node, launched in enumerate(nodes):
        output, _ = launched.communicate(timeout=1200)
        assert launched.returncode == 0, f"node {node}: {output[-3000:]}"
    assert os.listdir(out / "log_node1") == ["worker_1.log"]  # node 1 ran its worker, and no scheduler
    return str(out)


@pytest.mark.xdist_group("dp_run")
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


@pytest.mark.xdist_group("dp_run")
def test_moving_bn_statistics_agree_across_ranks(dp_run):
    """BN not frozen: each rank normalises by its own half batch, and all move their running statistics by the
    mean of both halves' statistics (broken once: the update read the statistics before the kernel wrote them)."""
    single = np.load(os.path.join(dp_run, "single.npz"))
    rank0, rank1 = (np.load(os.path.join(dp_run, f"rank{rank}_bn_moving.npz")) for rank in (0, 1))
    assert not np.array_equal(rank0["features.0.moving_mean"], single["features.0.moving_mean"])  # they moved
    for name in rank0.files:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)


@pytest.mark.xdist_group("dp_run")
def test_reestimated_bn_statistics_agree_across_ranks(dp_run):
    """BN re-estimation on 2 ranks, each over its own half batches: the statistics of both halves, agreed."""
    moving, rank0, rank1 = (np.load(os.path.join(dp_run, name)) for name in
                            ("rank0_bn_moving.npz", "rank0_bn_reestimated.npz", "rank1_bn_reestimated.npz"))
    assert not np.array_equal(rank0["features.0.moving_mean"], moving["features.0.moving_mean"])
    for name in rank0.files:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)


SCRIPT_EPOCHS = 12


def run_train_script(demo_data, float_run, folder, *more, wait=True):
    """bash scripts/run_train.sh CPU 2 ... in `folder`: SCRIPT_EPOCHS QAT epochs from float_run on 2 ranks."""
    from conftest import tiny_argv
    command = ["bash", os.path.join(ROOT, "scripts", "run_train.sh"), "CPU", "2", demo_data[0], float_run,
               *tiny_argv(), "--start_epoch", "2", "--epoch_size", str(SCRIPT_EPOCHS), *more]
    launch = dict(cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                  env=dict(os.environ, MASTER_PORT=str(free_port()), CLUSTER_TIMEOUT=CLUSTER_TIMEOUT))
    return subprocess.run(command, timeout=1200, **launch) if wait else subprocess.Popen(command, **launch)


@pytest.fixture(scope="module")
def script_run(demo_data, float_run, tmp_path_factory):
    """The users' entry point, uninterrupted: its folder (train/log, train/checkpoint)."""
    folder = tmp_path_factory.mktemp("script")
    launched = run_train_script(demo_data, float_run, folder)
    assert launched.returncode == 0, launched.stdout[-3000:]
    return folder


@pytest.mark.xdist_group("script_run")
def test_run_train_script_on_two_cpu_workers_then_run_infer(demo_data, script_run):
    """The users' entry points: 2 CPU ranks through msrun, per-rank logs, rank 0's checkpoints, then inference."""
    train_path, val_path = demo_data
    from conftest import tiny_argv
    logs = [(script_run / "train" / "log" / f"worker_{rank}.log").read_text() for rank in (0, 1)]
    threads = threads_per_worker(2) if "OMP_NUM_THREADS" not in os.environ else os.environ["OMP_NUM_THREADS"]
    for rank, log in enumerate(logs):  # each rank trains on its half: 24 images, 3 batches of 8
        assert f"epoch: [  0/ {SCRIPT_EPOCHS}], step:[    2/    3], loss:[" in log
        assert re.search(rf"rank {rank} of 2 \(process \d+\): {threads} CPU threads", log)  # its share of the cores
    assert "effective config:" in logs[0] and "effective config:" not in logs[1]
    checkpoints = sorted(os.listdir(script_run / "train" / "checkpoint"))
    assert checkpoints == sorted(f"mobilenetV2_quant-{epoch}_3.ckpt" for epoch in range(1, SCRIPT_EPOCHS + 1))
    inferred = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_infer_quant.sh"), "CPU", val_path,
                               str(script_run / "train" / "checkpoint" / checkpoints[0]), *tiny_argv()],
                              cwd=script_run, capture_output=True, text=True)
    assert inferred.returncode == 0, inferred.stdout + inferred.stderr
    assert inferred.stdout.startswith("result:{'acc': ") and "'images': 24" in inferred.stdout
    usage = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_train.sh"), "GPU", "zero", train_path],
                           cwd=script_run, capture_output=True, text=True)
    assert usage.returncode != 0 and "DEVICE_ID_LIST must look like 0,1,2,3" in usage.stdout
    assert "bash run_train.sh [GPU] [DEVICE_ID_LIST]" in usage.stdout
    half_given = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_train.sh"), "CPU", "1", train_path],
                                cwd=script_run, capture_output=True, text=True, env=dict(os.environ, NODE_NUM="2"))
    assert half_given.returncode != 0 and "NODE_NUM=2 needs NODE_RANK and MASTER_ADDR" in half_given.stdout


@pytest.mark.xdist_group("script_run")
def test_a_killed_rank_ends_the_job_and_resume_latest_continues_exactly(demo_data, float_run, script_run,
                                                                        tmp_path):
    """script_run's command, rank 1 killed (SIGKILL) once rank 0 has saved epoch 1: the job ends, naming the rank
    and the newest checkpoint; the same command with --resume latest ends where script_run ended, bit for bit."""
    from conftest import checkpoint_arrays
    from src.trainer import list_checkpoints
    saved, log1 = tmp_path / "train" / "checkpoint", tmp_path / "train" / "log" / "worker_1.log"
    running = run_train_script(demo_data, float_run, tmp_path, wait=False)
    deadline = time.time() + 900
    while running.poll() is None and time.time() < deadline and not (saved / "mobilenetV2_quant-1_3.ckpt").exists():
        time.sleep(0.05)
    found = re.search(r"rank 1 of 2 \(process (\d+)\)", log1.read_text()) if log1.exists() else None
    assert found and running.poll() is None, "rank 1 did not start, or the run ended before the kill"
    os.kill(int(found.group(1)), signal.SIGKILL)
    output, _ = running.communicate(timeout=600)
    assert running.returncode != 0 and "training failed" in output
    assert f"rank 1 (process {found.group(1)}) was killed by SIGKILL" in output, output[-3000:]
    newest = re.search(r"the newest checkpoint: (\S+);", output)
    assert newest and newest.group(1) == list_checkpoints(str(saved), quantized=True)[-1], output[-3000:]
    assert not os.path.exists(saved / f"mobilenetV2_quant-{SCRIPT_EPOCHS}_3.ckpt")

    resumed = run_train_script(demo_data, float_run, tmp_path, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {newest.group(1)}" in (tmp_path / "train" / "log" / "worker_0.log").read_text()
    final = f"mobilenetV2_quant-{SCRIPT_EPOCHS}_3.ckpt"
    got, meta = checkpoint_arrays(str(saved / final))
    want, _ = checkpoint_arrays(str(script_run / "train" / "checkpoint" / final))
    assert gradient_moved_all(checkpoint_arrays(newest.group(1))[0], got)
    assert meta["epoch_num"] == SCRIPT_EPOCHS and set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


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
                               "--master_port", str(free_port()), "--log_dir", str(tmp_path / "log"), str(script)],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert launched.stdout.startswith(os.path.join(os.path.dirname(sys.executable), "msrun") + " ")
    assert f"worker python {sys.executable}" in (tmp_path / "log" / "worker_0.log").read_text()


@pytest.mark.quick
def test_each_worker_gets_its_share_of_the_cores():
    from src.launch import worker_environment
    assert [threads_per_worker(local, cores=8) for local in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert worker_environment(3)["OMP_NUM_THREADS"] == "3"


@pytest.mark.quick
def test_launch_refuses_a_master_port_in_use_or_not_on_node_0(tmp_path):
    import socket
    script = tmp_path / "script.py"
    script.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2",
                                  "--master_port", str(port), str(script)], capture_output=True, text=True)
    assert refused.returncode == 2
    assert f"the master's port is in use on this machine (127.0.0.1:{port})" in refused.stderr
    elsewhere = subprocess.run([sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2",
                                "--master_addr", "192.0.2.1", str(script)], capture_output=True, text=True)
    assert elsewhere.returncode == 2  # TEST-NET-1: nobody's address
    assert "--master_addr 192.0.2.1 is not an address of this machine, and node 0" in elsewhere.stderr


def test_a_node_whose_master_never_answers_fails_within_the_cluster_timeout(tmp_path):
    """Node 1 of 2 pointed at a master nobody runs (a wrong --master_addr, or node 0 never started)."""
    script = tmp_path / "join.py"
    script.write_text("from mindspore.communication import init\ninit()\n")
    port = free_port()
    launched = subprocess.run([_second_machine(tmp_path / "node1"), os.path.join(ROOT, "src", "launch.py"),
                               "--worker_num", "2", "--local_worker_num", "1", "--node_rank", "1", "--master_addr",
                               "127.0.0.1", "--master_port", str(port), "--cluster_timeout", "10", "--log_dir",
                               str(tmp_path / "log"), str(script)], capture_output=True, text=True, timeout=300)
    assert launched.returncode != 0
    assert (f"error: the cluster did not form within 10 s: every node must be started with the same --worker_num, "
            f"node 0 must run the master at 127.0.0.1:{port}") in launched.stderr, launched.stdout[-2000:]


@pytest.mark.quick
def test_a_worker_that_fails_before_naming_itself_is_quoted(tmp_path):
    """Workers that fail at start, before they log their rank and process (as `run_train.sh GPU` fails with a
    CPU-only MindSpore, at set_device): the launcher's report quotes each log's error, not only its folder."""
    script = tmp_path / "fails.py"
    script.write_text("import os\nraise RuntimeError(f'no device for rank {os.environ[\"RANK_ID\"]}')\n")
    launched = subprocess.run([sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2",
                               "--master_port", str(free_port()), "--cluster_timeout", CLUSTER_TIMEOUT, "--log_dir",
                               str(tmp_path / "log"), str(script)], capture_output=True, text=True, timeout=120)
    assert launched.returncode != 0
    assert re.search(r"error: worker process \d+ exited with code 1; msrun stopped the other ranks on this node; "
                     r"logs: ", launched.stderr), launched.stderr[-2000:]
    quoted = re.findall(r"^  worker_(\d)\.log: RuntimeError: no device for rank (\d)$", launched.stderr, re.MULTILINE)
    assert quoted and all(log == rank for log, rank in quoted), launched.stderr[-2000:]
