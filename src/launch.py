"""Start a script on several devices (or CPU worker processes) through MindSpore's own launcher, msrun (dynamic
cluster): one process per device, ranks agreed over TCP with the master (node 0's address and port).

    one machine:  python src/launch.py --worker_num 8 --log_dir ./train train.py --run_distribute True ...
    two machines, 8 devices each, the same command on both but for --node_rank:
                  python src/launch.py --worker_num 16 --local_worker_num 8 --node_rank 0 \
                      --master_addr 10.0.0.1 train.py --run_distribute True ...    (on 10.0.0.1)
                  ... --node_rank 1 ...                                         (on the other machine)
Each rank's output goes to <log_dir>/worker_<rank>.log (msrun's naming) on the node that runs it.
"""
import argparse
import os
import shutil
import subprocess
import sys


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
                  local_worker_num=None, node_rank=0, master_addr="127.0.0.1"):
    """msrun's command line: `worker_num` ranks over all nodes, `local_worker_num` (all of them by default) on this
    one, node `node_rank`; the master listens on node 0 at master_addr:master_port."""
    local_worker_num = worker_num if local_worker_num is None else local_worker_num
    command = [find_msrun(), f"--worker_num={worker_num}", f"--local_worker_num={local_worker_num}",
               f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
               f"--log_dir={log_dir}", "--join=True"]
    if rank_table_file:  # Ascend: HCCL takes the devices' addresses from the rank table
        command.append(f"--rank_table_file={rank_table_file}")
    return command + [script, *script_args]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker_num", type=int, required=True, help="processes (devices) on all nodes together")
    parser.add_argument("--local_worker_num", type=int, default=None,
                        help="processes on this node (default: all of --worker_num, one node)")
    parser.add_argument("--node_rank", type=int, default=0, help="this node's rank, 0 to nodes - 1")
    parser.add_argument("--master_addr", default="127.0.0.1",
                        help="node 0's address, the same on every node (default: this machine, one node)")
    parser.add_argument("--master_port", type=int, default=8118)
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
    threads = args.threads_per_worker or (None if "OMP_NUM_THREADS" in os.environ else threads_per_worker(local))
    command = msrun_command(args.script, args.script_args, args.worker_num, args.master_port, args.log_dir,
                            args.rank_table_file, local, args.node_rank, args.master_addr)
    print(" ".join(command), flush=True)
    sys.exit(subprocess.call(command, env=worker_environment(threads)))


if __name__ == "__main__":
    main()
