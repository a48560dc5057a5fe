"""Start a script on several devices (or CPU worker processes) of this machine through MindSpore's own launcher,
msrun (dynamic cluster): one process per device, ranks agreed over a TCP port on loopback.

    python src/launch.py --worker_num 8 --log_dir ./train train.py --run_distribute True --dataset_path ...
Each rank's output goes to <log_dir>/worker_<rank>.log (msrun's naming).
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


def worker_environment():
    """This process's environment with this Python's folder first on PATH: msrun starts each worker as `python`
    from PATH, which must be the Python that has MindSpore."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def msrun_command(script, script_args, worker_num, master_port=8118, log_dir="./log", rank_table_file=None):
    command = [find_msrun(), f"--worker_num={worker_num}", f"--local_worker_num={worker_num}", "--master_addr=127.0.0.1",
               f"--master_port={master_port}", f"--log_dir={log_dir}", "--join=True"]
    if rank_table_file:  # Ascend: HCCL takes the devices' addresses from the rank table
        command.append(f"--rank_table_file={rank_table_file}")
    return command + [script, *script_args]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker_num", type=int, required=True, help="processes (devices) to start")
    parser.add_argument("--master_port", type=int, default=8118)
    parser.add_argument("--log_dir", default="./log")
    parser.add_argument("--rank_table_file", default=None, help="Ascend rank table (HCCL)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker_num < 1:
        parser.error(f"--worker_num must be at least 1, got {args.worker_num}")
    if not os.path.isfile(args.script):
        parser.error(f"script not found: {args.script}")
    if args.rank_table_file and not os.path.isfile(args.rank_table_file):
        parser.error(f"rank table not found: {args.rank_table_file}")
    command = msrun_command(args.script, args.script_args, args.worker_num, args.master_port, args.log_dir,
                            args.rank_table_file)
    print(" ".join(command), flush=True)
    sys.exit(subprocess.call(command, env=worker_environment()))


if __name__ == "__main__":
    main()
