"""Start a script on several devices (or CPU worker processes) through MindSpore's own launcher, msrun (dynamic
cluster): one process per device, ranks agreed over TCP with the master (node 0's address and port).

    one machine:  python src/launch.py --worker_num 8 --log_dir ./train train.py --run_distribute True ...
    two machines, 8 devices each, the same command on both but for --node_rank:
                  python src/launch.py --worker_num 16 --local_worker_num 8 --node_rank 0 \
                      --master_addr 10.0.0.1 train.py --run_distribute True ...    (on 10.0.0.1)
                  ... --node_rank 1 ...                                         (on the other machine)
Each rank's output goes to <log_dir>/worker_<rank>.log (msrun's naming) on the node that runs it.

When a rank fails (an error, or killed), msrun stops the others and this launcher ends with a message that names
the rank, its log and the newest checkpoint the script reported ("checkpoint saved: PATH" lines of rank 0, as
train.py writes them), from which `--resume latest` with the same command continues. A cluster that does not form
(a node not started, a wrong --master_addr) fails after --cluster_timeout seconds; on node 0, a port in use
or an address not its own fails at once.
"""
import argparse
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

FAILED_WORKER = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")
LOST_RANK = re.compile(r"worker (\d+) is the first one timed out")  # the master's word, on node 0
CLUSTER_NOT_FORMED = "Failed to initialize distributed job cluster"
CHECKPOINT_SAVED = re.compile(r"^checkpoint saved: (.+)$", re.MULTILINE)
# A Python exception's last line ("RuntimeError: Unsupported device target GPU. ...") or our scripts' "error: ..."
ERROR_LINE = re.compile(r"^(?:[\w.]*(?:Error|Exception|Exit|Interrupt)|error): .+$", re.MULTILINE)


def find_msrun():
    """msrun beside this Python first (a virtual environment used without activating it), then on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "msrun")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("msrun")
    if found is None:
        raise FileNotFoundError(f"msrun not found beside {sys.executable} nor on PATH: it comes with MindSpore "
                                f"(pip install -r requirements.txt)")
    return found


def threads_per_worker(local_worker_num, cores=None):
    """Each worker's share of this node's cores: N ranks each with thread pools sized for all cores would
    oversubscribe them."""
    return max(1, (cores or os.cpu_count() or 1) // local_worker_num)


def worker_environment(threads=None):
    """This process's environment with this Python's folder first on PATH (msrun starts each worker as `python`
    from PATH, which must be the Python that has MindSpore) and, given `threads`, OMP_NUM_THREADS set to it: the
    worker's thread budget, for OpenMP (our CPU kernels) and, through train.py, MindSpore's CPU kernels."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def msrun_command(script, script_args, worker_num, master_port=8118, log_dir="./log", rank_table_file=None,
                  local_worker_num=None, node_rank=0, master_addr="127.0.0.1", cluster_timeout=600):
    """msrun's command line: `worker_num` ranks over all nodes, `local_worker_num` (all of them by default) on this
    one, node `node_rank`; the master listens on node 0 at master_addr:master_port; ranks wait at most
    `cluster_timeout` seconds for the others to join."""
    local_worker_num = worker_num if local_worker_num is None else local_worker_num
    command = [find_msrun(), f"--worker_num={worker_num}", f"--local_worker_num={local_worker_num}",
               f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
               f"--log_dir={log_dir}", "--join=True", f"--cluster_time_out={cluster_timeout}"]
    if rank_table_file:  # Ascend: HCCL takes the devices' addresses from the rank table
        command.append(f"--rank_table_file={rank_table_file}")
    return command + [script, *script_args]


def free_port():
    """A loopback port nobody listens on now: a --master_port for a launch on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def master_address_problem(address, port):
    """Why node 0's master cannot listen at address:port (None if it can): the port taken by another process, or
    an address that is not this machine's."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to the master
        try:
            probe.bind((address, port))
        except socket.gaierror as err:
            return f"--master_addr {address} does not resolve ({err.strerror})"
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return (f"the master's port is in use on this machine ({address}:{port}): another run? give another "
                        f"--master_port (the same on every node)")
            if err.errno == errno.EADDRNOTAVAIL:
                return (f"--master_addr {address} is not an address of this machine, and node 0 (this node, "
                        f"--node_rank 0) runs the master: give node 0's own address")
            raise
    return None


def run_msrun(command, env):
    """Run msrun, passing its output through, and note what a failure report needs: the worker processes msrun
    saw fail ({pid: exit code}), the rank the master lost first (None if it lost none) and whether the cluster
    failed to form. Returns (exit code, failed, lost, not_formed)."""
    failed, lost, not_formed = {}, None, False
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as msrun:
        for line in msrun.stdout:
            sys.stdout.write(line)
            found = FAILED_WORKER.search(line)
            if found:
                failed[int(found.group(1))] = int(found.group(2))
            found = LOST_RANK.search(line)
            if found and lost is None:
                lost = int(found.group(1))
            not_formed = not_formed or CLUSTER_NOT_FORMED in line
    sys.stdout.flush()
    return msrun.returncode, failed, lost, not_formed


def _worker_logs(log_dir):
    """{rank: path} of the worker logs msrun wrote on this node (worker_<rank>.log)."""
    logs = {}
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else ():
        found = re.fullmatch(r"worker_(\d+)\.log", name)
        if found:
            logs[int(found.group(1))] = os.path.join(log_dir, name)
    return logs


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def last_error_line(text, limit=400):
    """The last error a worker's log reports (a Python exception's message, or an "error: ..." line), None if none:
    what the user needs first, without opening the log."""
    found = ERROR_LINE.findall(text)
    if not found:
        return None
    line = found[-1].strip()
    return line if len(line) <= limit else line[:limit] + " ..."


def _exit_description(code):
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def failure_report(failed, lost, not_formed, log_dir, cluster_timeout, master):
    """What went wrong, for the user: which rank failed and how, its log, and where to continue from."""
    logs = _worker_logs(log_dir)
    texts = {rank: _read(path) for rank, path in logs.items()}
    lines = []
    if not_formed:
        lines.append(f"error: the cluster did not form within {cluster_timeout} s: every node must be started with "
                     f"the same --worker_num, node 0 must run the master at {master} (--master_addr is node 0's "
                     f"address, reachable from every node; --master_port free on it)")
    failed_ranks, quoted = set(), set()
    for pid, code in sorted(failed.items()):
        # the script names its process in its log (train.py: "rank R of N (process PID)")
        rank = next((r for r, text in texts.items() if f"(process {pid})" in text), None)
        failed_ranks.add(rank)
        who = f"rank {rank} (process {pid})" if rank is not None else f"worker process {pid}"
        where = f"its log: {logs[rank]}" if rank is not None else f"logs: {log_dir}"
        lines.append(f"error: {who} {_exit_description(code)}; msrun stopped the other ranks on this node; {where}")
        # a worker that failed before naming its process (e.g. at set_device): the errors of every log not quoted yet
        for r in [rank] if rank is not None else sorted(texts):
            error = last_error_line(texts[r]) if r not in quoted else None
            if error:
                quoted.add(r)
                lines.append(f"  worker_{r}.log: {error}")
    if lost is not None and lost not in failed_ranks:
        lines.insert(0, f"error: the master lost rank {lost} (it stopped answering: killed, or its node failed; "
                        f"that node's log says more) and stopped the job")
    if not lines:
        lines.append(f"error: the distributed job failed; logs: {log_dir}")
    saved = CHECKPOINT_SAVED.findall(texts.get(0, ""))
    if saved:
        lines.append(f"the newest checkpoint: {saved[-1].strip()}; the same command with --resume latest "
                     f"continues from it")
    elif 0 in texts:
        lines.append("no checkpoint was saved")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker_num", type=int, required=True, help="processes (devices) on all nodes together")
    parser.add_argument("--local_worker_num", type=int, default=None,
                        help="processes on this node (default: all of --worker_num, one node)")
    parser.add_argument("--node_rank", type=int, default=0, help="this node's rank, 0 to nodes - 1")
    parser.add_argument("--master_addr", default="127.0.0.1",
                        help="node 0's address, the same on every node (default: this machine, one node)")
    parser.add_argument("--master_port", type=int, default=8118)
    parser.add_argument("--cluster_timeout", type=int, default=600,
                        help="seconds the ranks wait for every node to join before failing (msrun's "
                             "--cluster_time_out)")
    parser.add_argument("--log_dir", default="./log")
    parser.add_argument("--rank_table_file", default=None, help="Ascend rank table (HCCL)")
    parser.add_argument("--threads_per_worker", type=int, default=None,
                        help="CPU threads of each worker (OMP_NUM_THREADS; default: OMP_NUM_THREADS if set, else "
                             "this node's cores / --local_worker_num)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker_num < 1:
        parser.error(f"--worker_num must be at least 1, got {args.worker_num}")
    local = args.worker_num if args.local_worker_num is None else args.local_worker_num
    if not 1 <= local <= args.worker_num:
        parser.error(f"--local_worker_num must be between 1 and --worker_num ({args.worker_num}), got {local}")
    nodes = -(-args.worker_num // local)
    if not 0 <= args.node_rank < nodes:
        parser.error(f"--node_rank must be between 0 and {nodes - 1} ({args.worker_num} workers, {local} on each "
                     f"node), got {args.node_rank}")
    if nodes > 1 and args.master_addr in ("127.0.0.1", "localhost"):
        print(f"note: {nodes} nodes with --master_addr {args.master_addr}: every node must run on this machine "
              f"(give node 0's address otherwise)", flush=True)
    if not os.path.isfile(args.script):
        parser.error(f"script not found: {args.script}")
    if args.rank_table_file and not os.path.isfile(args.rank_table_file):
        parser.error(f"rank table not found: {args.rank_table_file}")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        parser.error(f"--threads_per_worker must be at least 1, got {args.threads_per_worker}")
    if args.cluster_timeout < 1:
        parser.error(f"--cluster_timeout must be at least 1 second, got {args.cluster_timeout}")
    master = f"{args.master_addr}:{args.master_port}"
    problem = master_address_problem(args.master_addr, args.master_port) if args.node_rank == 0 else None
    if problem:
        parser.error(problem)
    threads = args.threads_per_worker or (None if "OMP_NUM_THREADS" in os.environ else threads_per_worker(local))
    command = msrun_command(args.script, args.script_args, args.worker_num, args.master_port, args.log_dir,
                            args.rank_table_file, local, args.node_rank, args.master_addr, args.cluster_timeout)
    print(" ".join(command), flush=True)
    returncode, failed, lost, not_formed = run_msrun(command, worker_environment(threads))
    if returncode != 0:
        sys.exit(failure_report(failed, lost, not_formed, args.log_dir, args.cluster_timeout, master))


if __name__ == "__main__":
    main()
