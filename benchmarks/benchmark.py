"""Throughput and memory of the suite at full size (MobileNetV2 1.0, 224x224, 1000 classes) on this machine.

    python benchmarks/benchmark.py [--batch_size 32] [--device_target CPU] [--output benchmarks/results/NAME.json]
    python benchmarks/tables.py    (the docs' figures from benchmarks/results/*.json)

Measures, each in a process of its own (so peak resident memory is per mode): float training, QAT training (one
process, and 2 data-parallel ranks through src/launch.py sharing this machine's cores at the same global batch)
and QAT evaluation images/s (random inputs: compute only; integer inference, and fake quantization: "simulated")
with graph compile time; the data pipeline alone (decode + augment + batch) on generated JPEGs of ImageNet-like
size; ONNX Runtime FP32 and INT8 images/s at the batch size and latency at batch 1; and, when the interpreter
given by --peer_python has PyTorch, the peer (benchmarks/peer_pytorch.py: PyTorch eager QAT of the same network,
its converted INT8 model), with glibc's default malloc and with one tuned for PyTorch (TUNED_MALLOC), with our/peer
ratios against the faster. Warm-up steps are excluded; each figure is a median of several runs.
Run by hand; not part of the test suite. --parts picks a subset.
"""
import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import src  # noqa: E402,F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
from src.launch import free_port  # noqa: E402

PARTS = ("data", "float_train", "qat_train", "qat_train_2_ranks", "qat_eval", "qat_eval_simulated", "onnx", "peer",
         "peer_malloc_tuned")
# glibc's malloc returns PyTorch's large buffers to the kernel after each step in these virtual machines, and the
# page faults that follow halved its training speed (measured); the peer runs both ways and the faster one counts.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
PEERS = ("peer", "peer_malloc_tuned")


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_rate(run, items, warmup, repeats):
    """(items per second, seconds per run), median over `repeats` timed runs after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return items / median, median


def cpu_info():
    """The CPU's model name and the instruction-set extensions that decide our kernels' and ONNX Runtime's paths."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "extensions": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})}


def _config(args):
    from easydict import EasyDict
    from src.config import CONFIGS
    return EasyDict(dict(CONFIGS[args.device_target], num_classes=1000, width_mult=1.0, image_height=224,
                         image_width=224, batch_size=args.batch_size))


def _setup(args):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    ms.set_seed(0)
    return ms


def part_train(args, quantized):
    """Training throughput; with --ranks N (this script started by src/launch.py) data parallel over N ranks,
    each on its share of the same global batch, rank 0 reporting."""
    ms = _setup(args)
    from src.layers import set_compute_dtype
    from src.lr_generator import get_lr
    from src.mobilenetV2 import network_from_config
    from src.quant.schedule import QuantSchedule
    from src.trainer import make_optimizer, make_train_cell
    rank, group = 0, None
    if args.ranks > 1:
        from train import init_data_parallel
        rank, ranks, group = init_data_parallel()
        assert ranks == args.ranks and args.batch_size % ranks == 0, (ranks, args.batch_size)
    config = _config(args)
    config.batch_size = args.batch_size // args.ranks
    network = network_from_config(config, quantized, group)
    set_compute_dtype(network, getattr(ms, config.compute_dtype))
    if quantized:  # the steady state of a QAT run: rounding on, BN not yet frozen, observers watching
        QuantSchedule(quant_delay=0).apply(network, 0)
    cell = make_train_cell(network, make_optimizer(network, get_lr(0, 0, 0, 0.01, 0, 1, 1000), config), config)
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.normal(0, 1, (config.batch_size, 3, 224, 224)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 1000, config.batch_size).astype(np.int32))
    start = time.perf_counter()
    cell(images, labels)[0].asnumpy()
    compile_s = time.perf_counter() - start
    gamma = network.features[0].gamma
    start_gamma = gamma.asnumpy().copy()
    rate, _ = _median_rate(lambda: cell(images, labels)[0].asnumpy(), args.batch_size, 1, args.repeats)
    # A step that moves no gradient-only Parameter measures a graph without a backward pass (as "QAT" once was).
    if np.array_equal(gamma.asnumpy(), start_gamma):
        raise RuntimeError("the training steps did not move features.0.gamma: no gradient reached it")
    result = {"images_per_s": rate, "compile_and_first_step_s": compile_s, "peak_rss_mb": _peak_rss_mb()}
    if args.ranks > 1:
        result.update(ranks=args.ranks, threads_per_rank=int(os.environ.get("OMP_NUM_THREADS", 0)) or None)
    return result if rank == 0 else None


def part_qat_eval(args, integer):
    ms = _setup(args)
    from src.mobilenetV2 import network_from_config
    from src.quant.layers import set_integer_inference
    network = network_from_config(_config(args), quantized=True)
    set_integer_inference(network, integer)
    network.set_train(False)
    images = ms.Tensor(np.random.default_rng(0).normal(0, 1, (args.batch_size, 3, 224, 224)).astype(np.float32))
    start = time.perf_counter()
    network(images).asnumpy()
    compile_s = time.perf_counter() - start
    rate, _ = _median_rate(lambda: network(images).asnumpy(), args.batch_size, 1, args.repeats)
    return {"images_per_s": rate, "compile_and_first_step_s": compile_s, "peak_rss_mb": _peak_rss_mb()}


def _write_jpegs(root, classes=8, per_class=64):
    """ImageNet-like JPEGs (about 500x375, smooth content with noise, quality 90)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BILINEAR), np.float32)
            image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(root, f"class{c}", f"{i}.JPEG"), quality=90)
    return classes * per_class


def part_data(args):
    _setup(args)
    from src.dataset import Epoch, create_dataset
    config = _config(args)
    with tempfile.TemporaryDirectory() as root:
        count = _write_jpegs(root)
        config.num_classes = 8

        def one_epoch():
            for _ in Epoch(create_dataset(root, True, config)):
                pass
        rate, _ = _median_rate(one_epoch, count, 1, args.repeats)
    return {"images_per_s": rate, "workers": config.num_parallel_workers}


def part_onnx(args):
    ms = _setup(args)
    import onnxruntime as ort
    from src.export import freeze_ranges
    from src.kernels import use_mindspore_ops
    from src.mobilenetV2 import network_from_config
    from src.targets.onnx_runtime import export_onnx
    from src.quant.schedule import QuantSchedule
    config = _config(args)
    rng = np.random.default_rng(0)
    batch = rng.normal(0, 1, (args.batch_size, 3, 224, 224)).astype(np.float32)
    single = batch[:1]
    results = {}
    with tempfile.TemporaryDirectory() as out:
        float_net = network_from_config(config, quantized=False)
        float_net.set_train(False)
        use_mindspore_ops(float_net)  # ONNX Runtime cannot run our CPU kernels
        for size, x in ((args.batch_size, batch), (1, single)):
            ms.export(float_net, ms.Tensor(x), file_name=os.path.join(out, f"fp32_b{size}"), file_format="ONNX")
        q_net = network_from_config(config, quantized=True)
        QuantSchedule(quant_delay=0, freeze_bn=0).apply(q_net, 0)
        q_net.set_train(True)
        q_net(ms.Tensor(batch))  # the observers see one batch, so the ranges are realistic
        freeze_ranges(q_net, 224, 224)
        export_onnx(q_net, os.path.join(out, "int8.onnx"), (3, 224, 224))
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count()
        models = {"fp32": (os.path.join(out, f"fp32_b{args.batch_size}.onnx"), os.path.join(out, "fp32_b1.onnx")),
                  "int8": (os.path.join(out, "int8.onnx"), os.path.join(out, "int8.onnx"))}
        for name, (batch_model, single_model) in models.items():
            session = ort.InferenceSession(batch_model, options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: batch}
            rate, _ = _median_rate(lambda: session.run(None, feed), args.batch_size, 2, args.repeats)
            session = ort.InferenceSession(single_model, options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: single}
            _, latency = _median_rate(lambda: session.run(None, feed), 1, 5, 5 * args.repeats)
            results[name] = {"images_per_s": rate, "latency_ms_batch1": 1000 * latency}
    results["int8_over_fp32"] = results["int8"]["images_per_s"] / results["fp32"]["images_per_s"]
    return results


def run_part(args):
    if args.part == "data":
        return part_data(args)
    if args.part in ("float_train", "qat_train"):
        return part_train(args, quantized=args.part == "qat_train")
    if args.part in ("qat_eval", "qat_eval_simulated"):
        return part_qat_eval(args, integer=args.part == "qat_eval")
    return part_onnx(args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device_target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median taken)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--output", default="benchmark.json")
    parser.add_argument("--peer_python", default=sys.executable,
                        help="a Python with PyTorch for the peer part (PyTorch is not a dependency of this project)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: one part, in a child process
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)  # internal: the part's ranks
    args = parser.parse_args()
    if args.part:
        result = run_part(args)
        if result is not None:  # data parallel: rank 0 alone
            print("RESULT " + json.dumps(result), flush=True)
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    results = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_info(), "device_target": args.device_target},
               "date": datetime.date.today().isoformat(), "batch_size": args.batch_size}
    for part in parts:
        print(f"running {part} ...", flush=True)
        env = dict(os.environ)
        if part in PEERS:
            if subprocess.run([args.peer_python, "-c", "import torch"], capture_output=True).returncode != 0:
                print(f"  skipped: no PyTorch in {args.peer_python} (see --peer_python)")
                continue
            command = [args.peer_python, os.path.join(ROOT, "benchmarks", "peer_pytorch.py")]
            if part == "peer_malloc_tuned":
                env.update(TUNED_MALLOC)
        elif part == "qat_train_2_ranks":  # 2 ranks through msrun on this machine, the cores shared between them
            log_dir = tempfile.mkdtemp(prefix="benchmark_ranks_")
            command = [sys.executable, os.path.join(ROOT, "src", "launch.py"), "--worker_num", "2", "--master_port",
                       str(free_port()), "--log_dir", log_dir, __file__, "--part", "qat_train", "--ranks", "2",
                       "--device_target", args.device_target]
        else:
            command = [sys.executable, __file__, "--part", part, "--device_target", args.device_target]
        child = subprocess.run(command + ["--batch_size", str(args.batch_size), "--repeats", str(args.repeats)],
                               capture_output=True, text=True, env=env)
        lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            results[part] = {"error": (child.stderr or child.stdout)[-2000:]}
            print(f"  {part} failed:\n{results[part]['error']}")
            continue
        results[part] = json.loads(lines[-1][len("RESULT "):])
        print(f"  {results[part]}", flush=True)
    if "float_train" in results and "qat_train" in results and "error" not in results["float_train"] \
            and "error" not in results["qat_train"]:
        results["qat_over_float_train"] = results["qat_train"]["images_per_s"] / results["float_train"]["images_per_s"]
        results["qat_over_float_train_memory"] = (results["qat_train"]["peak_rss_mb"]
                                                  / results["float_train"]["peak_rss_mb"])
    if "images_per_s" in results.get("qat_train", {}) and "images_per_s" in results.get("qat_train_2_ranks", {}):
        results["qat_train_2_ranks_over_1"] = (results["qat_train_2_ranks"]["images_per_s"]
                                               / results["qat_train"]["images_per_s"])
    if "images_per_s" in results.get("qat_eval", {}) and "images_per_s" in results.get("qat_eval_simulated", {}):
        results["integer_over_simulated_eval_time"] = (results["qat_eval_simulated"]["images_per_s"]
                                                       / results["qat_eval"]["images_per_s"])
    if "data" in results and "qat_train" in results and "error" not in results["data"] \
            and "error" not in results["qat_train"]:
        results["data_over_qat_train"] = results["data"]["images_per_s"] / results["qat_train"]["images_per_s"]
    ours = results.get("qat_train", {})
    peer_rates = [results[p]["qat_train_images_per_s"] for p in PEERS if "qat_train_images_per_s" in results.get(p, {})]
    if "images_per_s" in ours and peer_rates:
        results["qat_train_over_peer"] = ours["images_per_s"] / max(peer_rates)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(format_table(results))
    print(f"written: {args.output}")


def format_table(results):
    rows = []

    def row(name, part, key, unit):
        if part not in results:
            return  # not measured in this run
        value = results[part].get(key)
        rows.append(f"| {name} | {'failed' if value is None else f'{value:.1f} {unit}'} |")
    row("float training", "float_train", "images_per_s", "img/s")
    row("QAT training", "qat_train", "images_per_s", "img/s")
    row("QAT training, 2 ranks on the same cores (same global batch)", "qat_train_2_ranks", "images_per_s", "img/s")
    row("QAT evaluation (integer inference)", "qat_eval", "images_per_s", "img/s")
    row("QAT evaluation (simulated: fake quantization)", "qat_eval_simulated", "images_per_s", "img/s")
    row("data pipeline (decode + augment + batch)", "data", "images_per_s", "img/s")
    row("float training peak memory", "float_train", "peak_rss_mb", "MB")
    row("QAT training peak memory", "qat_train", "peak_rss_mb", "MB")
    row("float training compile + first step", "float_train", "compile_and_first_step_s", "s")
    row("QAT training compile + first step", "qat_train", "compile_and_first_step_s", "s")
    onnx = results.get("onnx", {})
    for name in ("fp32", "int8") if "onnx" in results else ():
        stats = onnx.get(name, {})
        rows.append(f"| ONNX Runtime {name.upper()}, batch {results['batch_size']} | "
                    f"{stats.get('images_per_s', float('nan')):.1f} img/s |")
        rows.append(f"| ONNX Runtime {name.upper()}, batch 1 latency | {stats.get('latency_ms_batch1', float('nan')):.1f} ms |")
    for key, label in (("qat_over_float_train", "QAT / float training throughput"),
                       ("qat_over_float_train_memory", "QAT / float training peak memory"),
                       ("qat_train_2_ranks_over_1", "QAT training, 2 ranks / 1 process throughput"),
                       ("integer_over_simulated_eval_time", "integer / simulated evaluation time"),
                       ("data_over_qat_train", "data pipeline / QAT training throughput")):
        if key in results:
            rows.append(f"| {label} | {results[key]:.2f}x |")
    if "int8_over_fp32" in onnx:
        rows.append(f"| ONNX INT8 / FP32 throughput | {onnx['int8_over_fp32']:.2f}x |")
    for part, malloc in zip(PEERS, ("default malloc", "tuned malloc")):
        peer = results.get(part, {})
        for key, label in (("float_train_images_per_s", "PyTorch float training"),
                           ("qat_train_images_per_s", "PyTorch eager QAT training"),
                           ("int8_infer_images_per_s", "PyTorch converted INT8 inference")):
            if key in peer:
                rows.append(f"| {label} ({malloc}) | {peer[key]:.1f} img/s |")
    if "qat_train_over_peer" in results:
        rows.append(f"| our QAT / PyTorch eager QAT training (the faster peer) | {results['qat_train_over_peer']:.2f}x |")
    return f"{machine_line(results)}\n\n| measure | value |\n|---|---|\n" + "\n".join(rows)


def cpu_kind(extensions):
    """What decides ONNX Runtime's integer path (and our kernels' vector width): AVX-512 VNNI, or AVX2 only."""
    if "avx512_vnni" in extensions:
        return "AVX-512 VNNI"
    return "AVX2 only" if "avx512f" not in extensions else "AVX-512 without VNNI"


def machine_line(results):
    machine = results["machine"]
    cpu = machine["cpu"]
    return (f"{cpu['model']}, {machine['cpus']} CPUs, {cpu_kind(cpu['extensions'])} "
            f"({' '.join(cpu['extensions'])}), {machine['device_target']}, {results.get('date', 'date not recorded')}")


if __name__ == "__main__":
    main()
