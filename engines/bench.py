"""Benchmarks: bi-level training-step cost, nearest-neighbour search, time to quality.

``python -m engines.bench [--out FILE] [--quick] [--seeds S ...] [--configs DIR]`` writes one JSON file and
prints a markdown summary; a line on stderr as each part starts says how far it is. The training modes' configs
are ``vqvae.yaml``, ``alt.yaml`` and ``mqvae.yaml`` in ``--configs`` (default ``configs/digits``, relative to the
working folder: run it from the repository root). ``--operations`` only counts the operations each mode's iteration
dispatches, and prints them.

The functions that build engines import ``.experiment`` when they run, not at the top: the nearest-neighbour
measurements run in fresh processes (``--nn-worker``), which then load only torch and ``mqvae.nn.search``.

Wall-clock numbers live here and in the JSON it writes, with the machine's load average before and after (a
figure taken while other processes wanted the cores is flagged ``under_load``); tests never assert them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mqvae.io.files import read_lines, write_json
from mqvae.nn.search import DEFAULT_CHUNK_ELEMENTS

CONFIGS = Path("configs") / "digits"  # relative to the working folder; --configs names another
MODES = ("vqvae", "alt", "mqvae", "mqvae_roll_back", "mqvae_ddagger", "mqvae_unroll2", "mqvae_unroll4")
# The modes with hypergradient.unroll_steps k: the codebook steps after every k-th iteration, so they are timed by
# windows of k iterations.
UNROLL_STEPS = {"mqvae_unroll2": 2, "mqvae_unroll4": 4}
PAPER_DATASET = "bench_random32"
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Configurations


def mode_config(mode: str, shape: str, batch_size: int, overrides: list[str] = (), configs: Path = CONFIGS):
    """The config of one training mode, for the ``digits`` shape (the configs in ``configs``) or the ``paper`` one."""
    from mqvae.config import load_config

    name = {"vqvae": "vqvae", "alt": "alt"}.get(mode, "mqvae")
    sets = ["device=auto", f"data.batch_size={batch_size}", "train.eval_every=0", "train.checkpoint_every=0"]
    if mode == "mqvae_roll_back":
        sets.append("hypergradient.roll_back=true")
    if mode == "mqvae_ddagger":  # MQ-VAE‡: configs/digits/mqvae_ddagger.yaml is mqvae.yaml with this key
        sets.append("hypergradient.mutual=true")
    if mode in UNROLL_STEPS:
        sets.append(f"hypergradient.unroll_steps={UNROLL_STEPS[mode]}")
    if shape == "paper":
        # MQ-VAE App. I: van den Oord et al.'s backbone (256 hidden units, two residual blocks, two stride-2
        # convolutions), 1024 codes of 512 dimensions, beta 0.1, lower lr 3e-4, codebook lr 6e-2, wd 1e-4.
        # Adam where the paper has AdamW, as in the measurements kept in bench_results/; both run fused
        # (engines.build.make_optimizer) and cost the same per step.
        _register_paper_dataset()
        sets += [f"data.name={PAPER_DATASET}", "model.hidden_channels=256", "model.res_channels=256",
                 "model.num_res_blocks=2", "model.downsample=2", "quantizer.num_codes=1024", "quantizer.dim=512",
                 "quantizer.beta=0.1"]
        if mode == "vqvae":
            sets += ["levels.0.optimizer=adam", "levels.0.lr=3.0e-4", "levels.0.weight_decay=1.0e-4"]
        else:
            sets += ["levels.0.optimizer=adam", "levels.0.lr=6.0e-2", "levels.0.weight_decay=1.0e-4",
                     "levels.1.optimizer=adam", "levels.1.lr=3.0e-4", "levels.1.weight_decay=1.0e-4"]
    return load_config(Path(configs) / f"{name}.yaml", [*sets, *overrides])


def _register_paper_dataset() -> None:
    """Random 32x32x3 images: the paper's input shape (CIFAR/SVHN); step cost does not depend on the pixels."""
    from mqvae.data import DATASETS, Datasets, register_dataset

    if PAPER_DATASET in DATASETS:
        return

    @register_dataset(PAPER_DATASET)
    def _random32(root: str, download: bool, seed: int) -> Datasets:
        from torch.utils.data import TensorDataset

        g = torch.Generator().manual_seed(seed)
        train = TensorDataset(torch.rand(2048, 3, 32, 32, generator=g), torch.zeros(2048, dtype=torch.long))
        test = TensorDataset(torch.rand(256, 3, 32, 32, generator=g), torch.zeros(256, dtype=torch.long))
        return Datasets(train=train, test=test, channels=3, image_size=32, num_classes=10)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# 1. Training-step cost per mode, interleaved


def _iteration(engine) -> None:
    engine.global_step += 1
    engine.iteration()  # (the steps and the note of the losses; replayed graphs under perf.cuda_graphs)
    engine.maintain()


def _iterations(mode: str, engine) -> int:
    """One timed sample of ``mode``: a window of its unrolled steps (one iteration, but for UNROLL_STEPS); how many
    iterations it ran."""
    window = UNROLL_STEPS.get(mode, 1)
    for _ in range(window):
        _iteration(engine)
    return window


def _engines(shape: str, batch_size: int, overrides: list[str], configs: Path, folder: Path) -> dict:
    """An engine of each mode in ``folder``, ready to train; all from the same seed and data set."""
    from .experiment import build_engine  # here, not at the top: see the module docstring

    engines = {}
    for mode in MODES:
        engine = build_engine(mode_config(mode, shape, batch_size, overrides, configs), folder / mode)
        engine.train()
        engines[mode] = engine
    return engines


def step_times(shape: str, batch_size: int, warmup: int, rounds: int, overrides: list[str] = (),
               profile_rounds: int = 0, configs: Path = CONFIGS) -> dict:
    """Median seconds per training iteration (``LevelEngine.iteration`` + quantizer maintenance) of each mode; for a mode with
    k unrolled steps, of a window of k iterations divided by k (``_iterations``).

    All engines are built from the same seed and data set, so they see batches of the same shape and
    distribution. After ``warmup`` iterations each, they run interleaved (A B C D A B C D ...), so that
    load from other processes spreads evenly over the modes. Then one more sample of each counts its dispatched
    operations (``operations_per_iteration``), and ``profile_rounds`` more iterations of each run under
    ``torch.profiler`` for the time per phase (``phase_times``); neither is in the medians.
    """
    with tempfile.TemporaryDirectory() as tmp:
        engines = _engines(shape, batch_size, overrides, configs, Path(tmp))
        device = next(iter(engines.values())).device
        times = {mode: [] for mode in MODES}
        for i in range(warmup + rounds):
            for mode, engine in engines.items():
                _sync(device)
                start = time.perf_counter()
                iterations = _iterations(mode, engine)
                _sync(device)
                if i >= warmup:
                    times[mode].append((time.perf_counter() - start) / iterations)
        operations = {mode: operations_per_iteration(mode, engine) for mode, engine in engines.items()}
        phases = {mode: phase_times(mode, engine, profile_rounds) for mode, engine in engines.items()} if profile_rounds else {}
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return {
        "batch_size": batch_size,
        "input_shape": list(engines["vqvae"].datasets.train[0][0].shape),
        "warmup": warmup,
        "rounds": rounds,
        "median_s": {mode: round(m, 6) for mode, m in medians.items()},
        "iqr_s": {mode: [round(q, 6) for q in _quartiles(t)] for mode, t in times.items()},
        "ratio_to_vqvae": {mode: round(medians[mode] / medians["vqvae"], 3) for mode in MODES if mode != "vqvae"},
        "operations_per_iteration": operations,
        "phases_ms": phases,
    }


class OperationCounter(TorchDispatchMode):
    """Counts the operations dispatched while it is active: every aten operator call that reaches the dispatcher
    below autograd (forward, backward and optimizer alike; a composite operator counts as the operators it is
    made of). Each is a call through torch's dispatcher, and on a GPU most are a kernel launch, so the count is the
    step's fixed overhead, whatever the sizes. (With the mode active, autograd also dispatches a detach for each
    output it saves for the backward, e.g. a ReLU's.)"""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations_per_iteration(mode: str, engine) -> float:
    """The operations one iteration of ``mode`` dispatches (``OperationCounter``), over one sample
    (``_iterations``: a window of k iterations divided by k for a mode with k unrolled steps). The same operators
    run on every device, so the count is (nearly) the same on the CPU and on a GPU, and it does not depend on the
    machine's load."""
    counter = OperationCounter()
    with counter:
        iterations = _iterations(mode, engine)
    return round(counter.count / iterations, 2)


# Samples before operations are counted alone (--operations): a level's first optimizer step creates its state, and
# an upper level's first 5 hypergradients are checked for being zero (mqvae.method.hypergradients.WATCHED_STEPS).
OPERATIONS_WARMUP = 6


# The speed-switch sets compared at the paper shape (``switch_times``); "fp32" is the configs' own settings.
SWITCH_SETS = {
    "fp32": [],
    "bf16": ["perf.bf16=true"],
    "compile": ["perf.compile=true"],
    "bf16+compile": ["perf.bf16=true", "perf.compile=true"],
    "cuda_graphs": ["perf.cuda_graphs=true"],
    "bf16+cuda_graphs": ["perf.bf16=true", "perf.cuda_graphs=true"],
}
# Iterations before timing under a switch set: compilation, and perf.cuda_graphs' eager warm-up and capture windows
# (engines.graphs: WARMUP_PERIODS + 2 periods, the longest period of the timed modes being UNROLL_STEPS' largest).
SWITCH_WARMUP = 12


def switch_times(batch_size: int, rounds: int, overrides: list[str] = (), configs: Path = CONFIGS) -> dict:
    """``step_times`` at the paper shape under each of ``SWITCH_SETS`` (CUDA only: on the CPU the switches are
    no-ops and perf.cuda_graphs is refused), and, for each set, the modes whose step it made slower than fp32's."""
    if not torch.cuda.is_available():
        return {"skipped": "the speed switches act on CUDA only (perf.cuda_graphs is refused on the CPU)"}
    from .graphs import WARMUP_PERIODS  # here, not at the top: see the module docstring

    warmup = max(SWITCH_WARMUP, (WARMUP_PERIODS + 2) * max(UNROLL_STEPS.values(), default=1))
    sets = {name: step_times("paper", batch_size, warmup, rounds, [*overrides, *switches], configs=configs)
            for name, switches in SWITCH_SETS.items()}
    base = sets["fp32"]["median_s"]
    return {name: {"switches": SWITCH_SETS[name], "median_s": st["median_s"],
                   "ratio_to_fp32": {mode: round(m / base[mode], 3) for mode, m in st["median_s"].items()},
                   "slower_than_fp32": [mode for mode, m in st["median_s"].items() if m > base[mode]]}
            for name, st in sets.items()}


def operation_counts(shape: str, batch_size: int, warmup: int = OPERATIONS_WARMUP, overrides: list[str] = (),
                     configs: Path = CONFIGS) -> dict:
    """``operations_per_iteration`` of each mode after ``warmup`` samples, timing nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        engines = _engines(shape, batch_size, overrides, configs, Path(tmp))
        for mode, engine in engines.items():
            for _ in range(warmup):
                _iterations(mode, engine)
        return {mode: operations_per_iteration(mode, engine) for mode, engine in engines.items()}


def operations_report(configs: Path = CONFIGS) -> dict:
    """``--operations``: ``operation_counts`` at both shapes, with the batches of a full run on this device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = {"digits": 64, "paper": 512 if device.type == "cuda" else 32}
    return {"device": str(device), "torch": torch.__version__,
            **{shape: {"batch_size": batch, "operations_per_iteration": operation_counts(shape, batch, configs=configs)}
               for shape, batch in batches.items()}}


def phase_times(mode: str, engine, rounds: int) -> dict:
    """Where an iteration's time goes: milliseconds per iteration in each ``mqvae.runtime.perf.phase`` region, from
    ``torch.profiler`` over ``rounds`` samples of ``mode`` (``_iterations``) (``<level>.forward`` / ``.backward`` / ``.optimizer_step`` /
    ``.roll_back``, ``hypergradient.<type>``, which runs inside the upper level's ``backward``).

    Host time (``cpu_time_total``); on CUDA also the kernels' time (``device_ms``). ``iteration`` is the wall
    time of a profiled iteration: the profiler's own overhead makes it larger than the unprofiled median.
    """
    from torch.profiler import ProfilerActivity, profile

    from mqvae.runtime.perf import PHASE_PREFIX

    # Kineto, the profiler's C++ side, writes to stderr: "USDT: ... profiler_start" and "profiler_stop" around each
    # profile, and on a CPU-only machine "gpuGetDeviceCount failed" as an ERROR. Its level is KINETO_LOG_LEVEL, read
    # when the profiler first starts in the process; 6 is above its highest kind (USDT, 5). A level set outside stays.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(engine.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        iterations = sum(_iterations(mode, engine) for _ in range(rounds))
        _sync(engine.device)
    out = {"iteration": round(1000 * (time.perf_counter() - start) / iterations, 3)}
    for event in prof.key_averages():
        if event.key.startswith(PHASE_PREFIX):
            name = event.key[len(PHASE_PREFIX):]
            out[name] = round(event.cpu_time_total / 1000 / iterations, 3)
            if cuda:
                out[name + ".device_ms"] = round(getattr(event, "device_time_total", 0.0) / 1000 / iterations, 3)
    return out


def _per_call(fn, calls: int, device) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls (one is far below the clock's resolution), device work
    included."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def finite_check_cost(batch_size: int, rounds: int, overrides: list[str] = (), calls: int = 2000,
                      configs: Path = CONFIGS) -> dict:
    """What the per-step checks cost on a digits VQ-VAE step (the shortest step, so the largest share): median
    seconds of one training iteration without them; of one update of the finiteness flag
    (``LevelEngine.note_finite``) and of one update of the level's zero-gradient counter (``Level._note_gradient``,
    one per optimizer step, on gradients of the level's real shapes), each timed over ``calls`` updates, since one
    is far below the clock's resolution; plus the flag's host sync (``check_finite``), which runs only at logging
    steps and before checkpoints."""
    from .experiment import build_engine  # here, not at the top: see the module docstring

    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(mode_config("vqvae", "digits", batch_size, overrides, configs), Path(tmp) / "vqvae")
        engine.train()
        (level,) = engine.problems
        steps, updates, zero_updates, syncs = [], [], [], []
        for i in range(3 + rounds):
            _sync(engine.device)
            start = time.perf_counter()
            _iteration(engine)
            _sync(engine.device)
            middle = time.perf_counter()
            update = _per_call(engine.note_finite, calls, engine.device)
            end = time.perf_counter()
            engine.check_finite()
            synced = time.perf_counter()
            for p in level.trainable_parameters():
                p.grad = torch.ones_like(p)
            zero_update = _per_call(level._note_gradient, calls, engine.device)
            level.zero_grad()
            if i >= 3:
                steps.append(middle - start)
                updates.append(update)
                syncs.append(synced - end)
                zero_updates.append(zero_update)
    step, update, sync, zero = (statistics.median(t) for t in (steps, updates, syncs, zero_updates))
    return {"step_s": round(step, 6), "flag_update_s": round(update, 9), "check_s": round(sync, 9),
            "flag_update_fraction_of_step": round(update / step, 5), "zero_gradient_update_s": round(zero, 9),
            "zero_gradient_update_fraction_of_step": round(zero / step, 5), "batch_size": batch_size, "rounds": rounds}


# ---------------------------------------------------------------------------------------------
# 1b. Data-parallel step time: N ranks x b against one process with N*b


def data_parallel_worker(mode: str, batch_size: int, warmup: int, rounds: int, configs: Path = CONFIGS) -> dict:
    """Median seconds of one training iteration of ``mode`` on digits (a ``--dp-worker`` process: under torchrun,
    one rank of a data-parallel run with ``batch_size`` per rank; without it, one process). The ranks start each
    iteration together (a barrier), so the time is that of the slowest rank."""
    from mqvae.runtime import distributed

    from .experiment import build_engine  # here, not at the top: see the module docstring

    cfg = mode_config(mode, "digits", batch_size, ["device=cpu"], configs)
    distributed.start(cfg.distributed.backend, cfg.distributed.timeout_s, cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(cfg, Path(tmp) / mode)
        engine.train()
        times = []
        for i in range(warmup + rounds):
            distributed.barrier()
            start = time.perf_counter()
            _iteration(engine)
            distributed.barrier()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    result = {"median_s": round(statistics.median(times), 6), "ranks": distributed.world_size(),
              "batch_per_rank": batch_size, "threads_per_process": torch.get_num_threads()}
    distributed.stop()
    return result


def data_parallel(batch_size: int, warmup: int, rounds: int, configs: Path = CONFIGS, ranks: int = 2) -> dict:
    """Per mode: the step time of ``ranks`` gloo ranks with ``batch_size`` each (torchrun on this machine's CPU,
    torchrun's one thread per rank) against one process with ``ranks * batch_size`` (all the machine's threads):
    the same global batch, so the ratio is what data parallelism costs or saves here."""
    rows = {}
    for mode in ("vqvae", "mqvae"):
        worker = ["-m", "engines.bench", "--dp-worker", mode, str(batch_size), str(warmup), str(rounds), str(configs)]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                  f"--master_port={port}", *worker]
        single_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE", "RANK")}
        parallel = _worker_json(subprocess.run(launch, capture_output=True, text=True, timeout=1800))
        single_worker = worker[:3] + [mode, str(ranks * batch_size)] + worker[5:]
        single = _worker_json(subprocess.run([sys.executable, *single_worker], capture_output=True, text=True,
                                             timeout=1800, env=single_env))
        rows[mode] = {"ranks": parallel, "one_process": single,
                      "ratio_ranks_to_one_process": round(parallel["median_s"] / single["median_s"], 3)}
    return {"global_batch": ranks * batch_size, "warmup": warmup, "rounds": rounds, "modes": rows}


def _worker_json(result: subprocess.CompletedProcess) -> dict:
    if result.returncode != 0:
        raise RuntimeError(f"data-parallel worker failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _quartiles(values):
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


# ---------------------------------------------------------------------------------------------
# 2. Nearest-neighbour search: chunked nearest_codes against naive cdist + argmin


def _naive(z, codebook):
    return torch.cdist(z, codebook).argmin(dim=1)


def _read_proc(key: str, path: str = "/proc/self/status") -> int:
    """A ``key: <n> kB`` entry of a Linux /proc file (``/proc/self/status``, ``/proc/meminfo``) in bytes."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def nn_worker(method: str, n: int, k: int, d: int, device: str, min_time: float) -> dict:
    """One measurement, meant to run in a fresh process so that its peak memory is its own."""
    from mqvae.nn.search import nearest_codes

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(n, d, device=dev, generator=g)
    codebook = torch.randn(k, d, device=dev, generator=g)
    fn = (lambda: nearest_codes(z, codebook)) if method == "chunked" else (lambda: _naive(z, codebook))
    # Warm the kernels up on a small slice so that the measurement does not include library loading.
    small = z[: min(n, 256)]
    nearest_codes(small, codebook) if method == "chunked" else _naive(small, codebook)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        how = "CUDA caching allocator: max_memory_allocated - memory_allocated before the call (inputs excluded)"
    else:
        # tracemalloc does not see torch's allocations; the kernel's resident-set high-water mark does.
        # Writing 5 to clear_refs resets VmHWM to the current RSS, so the peak is this call's own.
        try:
            Path("/proc/self/clear_refs").write_text("5")
            how = "process VmHWM after resetting it (/proc/self/clear_refs=5) minus VmRSS before the call, fresh subprocess, inputs excluded"
        except OSError:
            how = "process VmHWM (ru_maxrss) minus VmRSS before the call, fresh subprocess, inputs excluded (upper bound)"
        base = _read_proc("VmRSS")
    times = []
    started = time.perf_counter()
    while not times or (time.perf_counter() - started < min_time and len(times) < 5):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = _read_proc("VmHWM") - base
    seconds = statistics.median(times)
    return {"seconds": round(seconds, 6), "vectors_per_s": round(n / seconds, 1), "peak_extra_bytes": int(peak),
            "peak_extra_mib": round(peak / (1 << 20), 2), "repeats": len(times), "memory_method": how}


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(8 * GiB, free // 2)
    try:
        available = _read_proc("MemAvailable", "/proc/meminfo")
    except (OSError, KeyError):
        available = 16 * GiB
    return min(8 * GiB, available // 2)


def nn_search(grid: list[tuple[int, int, int]], device: torch.device, min_time: float) -> list[dict]:
    budget = _memory_budget(device)
    rows = []
    for n, k, d in grid:
        inputs = (n + k) * d * 4
        for method in ("chunked", "naive"):
            row = {"N": n, "K": k, "D": d, "method": method}
            # cdist materializes the N x K float32 distance matrix (and temporaries of that size).
            need = n * k * 4 if method == "naive" else 0
            if need + inputs > budget:
                row.update(status="skipped", reason=f"naive N x K float32 distance matrix needs {need / GiB:.1f} GiB, "
                                                    f"over the {budget / GiB:.1f} GiB budget")
                rows.append(row)
                continue
            cmd = [sys.executable, "-m", "engines.bench", "--nn-worker", method, str(n), str(k), str(d), str(device), str(min_time)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                row.update(status="failed", reason=(result.stderr.strip().splitlines() or ["?"])[-1][:200])
            else:
                row.update(status="ok", **json.loads(result.stdout.strip().splitlines()[-1]))
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Time to quality (MQ-VAE Fig. 4), over seeds


def _test_mse_curve(mode: str, iters: int, eval_every: int, batch_size: int, seed: int,
                    overrides=(), configs: Path = CONFIGS) -> list[tuple[float, float]]:
    from .experiment import build_engine, initialize_codebook  # here, not at the top: see the module docstring

    cfg = mode_config(mode, "digits", batch_size, [f"seed={seed}", f"train.iters={iters}",
                                                   f"train.eval_every={eval_every}", f"train.log_every={eval_every}",
                                                   *overrides], configs)
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(cfg, Path(tmp))
        if cfg.quantizer.kmeans_init:
            initialize_codebook(engine)
        engine.run()
        records = read_lines(Path(tmp) / "log.jsonl")
    return [(r["time_s"], r["test_mse"]) for r in records if "test_mse" in r]


def seed_time_to_quality(seed: int, iters: int, eval_every: int, batch_size: int, overrides=(),
                         configs: Path = CONFIGS) -> dict:
    """One seed: the training time MQ-VAE needs to reach VQ-VAE's final test MSE, relative to VQ-VAE's time."""
    baseline = _test_mse_curve("vqvae", iters, eval_every, batch_size, seed, overrides, configs)
    method = _test_mse_curve("mqvae", iters, eval_every, batch_size, seed, overrides, configs)
    target_time, target = baseline[-1]
    reached = next((t for t, mse in method if mse <= target), None)
    reason = None if reached is not None else (
        f"never reached: MQ-VAE's best test MSE {min(mse for _, mse in method):.5g} in {iters} iterations "
        f"({method[-1][0]:.1f} s) stayed above VQ-VAE's final {target:.5g}")
    return {
        "seed": seed,
        "vqvae_final_test_mse": target,
        "vqvae_total_time_s": target_time,
        "mqvae_final_test_mse": method[-1][1],
        "mqvae_total_time_s": method[-1][0],
        "mqvae_time_to_reach_s": reached,
        "mqvae_time_to_reach_s_reason": reason,
        "ratio_to_vqvae_time": None if reached is None else round(reached / target_time, 4),
        "curves": {"vqvae": baseline, "mqvae": method},
    }


def median_ratio(per_seed: list[dict]) -> tuple[float | None, str | None]:
    """Median over all seeds of ``ratio_to_vqvae_time``, or None with the reason.

    A seed that never reached VQ-VAE's MSE stays in: its ratio is unknown but above its own run's
    mqvae_total_time_s / vqvae_total_time_s (MQ-VAE would have needed longer than it ran). Dropping it would
    flatter MQ-VAE. So the median is a number only where any such value leaves it the same, i.e. where it
    is the same with those seeds at their lower bounds and at infinity; with half of the seeds or fewer
    reaching the MSE it is infinite, "not reached".
    """
    reached = [row["ratio_to_vqvae_time"] for row in per_seed if row["ratio_to_vqvae_time"] is not None]
    bounds = [row["mqvae_total_time_s"] / row["vqvae_total_time_s"] for row in per_seed
              if row["ratio_to_vqvae_time"] is None]
    if 2 * len(reached) <= len(per_seed):
        return None, (f"not reached: {len(reached)} of {len(per_seed)} seeds reached VQ-VAE's final test MSE, "
                      "the median over seeds needs more than half")
    low, high = statistics.median(reached + bounds), statistics.median(reached + [math.inf] * len(bounds))
    if low != high:
        return None, (f"undetermined: a seed that never reached VQ-VAE's final test MSE ran only {min(bounds):.3g}x "
                      f"VQ-VAE's time, so the median over seeds lies between {low:.3g} and {high:.3g}")
    return round(high, 4), None


def time_to_quality(iters: int, eval_every: int, batch_size: int, seeds, overrides=(), configs: Path = CONFIGS) -> dict:
    """``seed_time_to_quality`` for every seed and their ``median_ratio``; both modes of a seed run back to back,
    so that load from other processes drifts over the seeds rather than between the modes."""
    per_seed = [seed_time_to_quality(seed, iters, eval_every, batch_size, overrides, configs) for seed in seeds]
    median, reason = median_ratio(per_seed)
    return {
        "config": {"baseline": (Path(configs) / "vqvae.yaml").as_posix(),
                   "method": (Path(configs) / "mqvae.yaml").as_posix(),
                   "iters": iters, "eval_every": eval_every, "batch_size": batch_size, "seeds": list(seeds)},
        "seeds_reached": sum(row["ratio_to_vqvae_time"] is not None for row in per_seed),
        "median_ratio_to_vqvae_time": median,
        "median_ratio_to_vqvae_time_reason": reason,
        "per_seed": per_seed,
        "note": "time_s is training wall-clock (evaluation excluded) at each eval record; the median is over all "
                "seeds, a seed that never reached the MSE counting as slower than its own run (see median_ratio)",
    }


# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def machine_load(before: tuple[float, float, float]) -> dict:
    """The load averages (1, 5 and 15 minutes) ``before`` the benchmark and now, after it, against the machine's
    cores (both count the whole machine, not this process's share of it). The figures were taken ``under_load`` when
    the 1-minute average, the one nearest the run's start and end, was above the cores before or after: other
    processes then wanted cores the benchmark was using, and its times are not an idle machine's."""
    after = os.getloadavg()
    cores = os.cpu_count()
    return {"cores": cores, "before": [round(v, 2) for v in before], "after": [round(v, 2) for v in after],
            "under_load": before[0] > cores or after[0] > cores}


def run_bench(quick: bool, sizes: dict | None = None, configs: Path = CONFIGS) -> dict:
    """All three benchmarks. ``sizes`` overrides the settings (used by the smoke test); ``configs`` is the folder
    of the training modes' configs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    s = {
        "digits_batch": 64,
        "paper_batch": 512 if cuda else (16 if quick else 32),
        "warmup": 3 if quick else 10,
        "rounds": {"digits": 15 if quick else 60, "paper": 3 if quick else 12},
        "nn_grid": ([(1 << 14, 1024, 64), (1 << 17, 1024, 64), (1 << 14, 16384, 256)] if quick else
                    [(n, k, d) for n in (1 << 14, 1 << 17, 1 << 20) for k in (1024, 16384) for d in (64, 256)]),
        "nn_min_time": 0.2 if quick else 1.0,
        "ttq_iters": 150 if quick else 1500,
        "ttq_eval_every": 25 if quick else 50,
        "ttq_seeds": [0, 1, 2],  # --quick too: fewer iterations, never fewer seeds
        "paper_warmup": 1 if quick else 2,
        "profile_rounds": {"digits": 5 if quick else 20, "paper": 1 if quick else 3},
        "overrides": [],  # extra config overrides for every engine (the smoke test shrinks the models)
        "data_parallel": True,  # 2 gloo ranks x 32 against one process x 64 (the smoke test leaves it out)
    }
    s.update(sizes or {})
    started = time.perf_counter()
    load_before = os.getloadavg()
    parts = {  # key in the result: what the progress line calls the part, and the part
        "digits": ("training-step cost, digits shape",
                   lambda: step_times("digits", s["digits_batch"], s["warmup"], s["rounds"]["digits"], s["overrides"],
                                      s["profile_rounds"]["digits"], configs)),
        "paper": ("training-step cost, paper shape",
                  lambda: step_times("paper", s["paper_batch"], s["paper_warmup"], s["rounds"]["paper"], s["overrides"],
                                     s["profile_rounds"]["paper"], configs)),
        "finite_check": ("cost of the per-step checks",
                         lambda: finite_check_cost(s["digits_batch"], s["rounds"]["digits"], s["overrides"],
                                                   configs=configs)),
        "switches": ("speed switches, paper shape",
                     lambda: switch_times(s["paper_batch"], s["rounds"]["paper"], s["overrides"], configs)),
        "data_parallel": ("data-parallel step time",
                          lambda: data_parallel(s["digits_batch"] // 2, s["warmup"], s["rounds"]["digits"], configs)),
        "nn_search": ("nearest-neighbour search", lambda: nn_search(s["nn_grid"], device, s["nn_min_time"])),
        "time_to_quality": ("time to quality",
                            lambda: time_to_quality(s["ttq_iters"], s["ttq_eval_every"], s["digits_batch"],
                                                    s["ttq_seeds"], s["overrides"], configs)),
    }
    if not s["data_parallel"]:
        del parts["data_parallel"]
    measured = {}
    for i, (key, (name, part)) in enumerate(parts.items(), 1):
        # On stderr: a full run takes minutes, and stdout is the summary's.
        print(f"engines.bench {i}/{len(parts)}: {name} ({time.perf_counter() - started:.0f} s so far)",
              file=sys.stderr, flush=True)
        measured[key] = part()
    steps = {"digits": measured["digits"], "paper": measured["paper"]}
    steps["digits"]["config"] = f"{Path(configs).as_posix()}/{{vqvae,alt,mqvae}}.yaml (+ hypergradient.roll_back=true; + hypergradient.mutual=true)"
    steps["paper"]["config"] = ("MQ-VAE App. I: random 32x32x3 inputs, hidden 256, res 256, 2 residual blocks, "
                                "downsample 2, 1024 codes x 512 dims, beta 0.1, AdamW; batch 512 on GPU, "
                                f"{s['paper_batch']} here" if not cuda else "MQ-VAE App. I, batch 512")
    return {
        "quick": quick,
        "settings": {k: v for k, v in s.items() if k != "nn_grid"},
        "grid": "reduced (--quick)" if quick else "full",
        "environment": environment(device),
        "step_time_ratio": {shape: steps[shape]["ratio_to_vqvae"] for shape in steps},
        "step_time": steps,
        "nn_search": {"memory_budget_bytes": _memory_budget(device), "rows": measured["nn_search"],
                      "chunked": f"mqvae.nn.search.nearest_codes (default chunk_elements for {device.type}: "
                                 f"{DEFAULT_CHUNK_ELEMENTS.get(device.type)}, fp32)",
                      "naive": "torch.cdist(z, codebook).argmin(dim=1)"},
        "finite_check": measured["finite_check"],
        "switches": measured["switches"],
        "data_parallel": measured.get("data_parallel"),
        "time_to_quality": measured["time_to_quality"],
        "total_bench_s": round(time.perf_counter() - started, 1),
        "load": machine_load(load_before),
    }


def summary(result: dict) -> str:
    lines = [f"## engines.bench ({result['grid']}, {result['environment']['device']}, torch {result['environment']['torch']}, "
             f"{result['environment']['threads']} threads)", ""]
    load = result["load"]
    if load["under_load"]:
        lines += [f"warning: the machine was under load, its 1-minute load average above its {load['cores']} cores "
                  f"({load['before'][0]:.2f} before, {load['after'][0]:.2f} after): other processes competed for "
                  "the cores, so these times are not an idle machine's", ""]
    lines += ["| shape | batch | VQ-VAE s/it | alt (xi=0) | MQ-VAE | MQ-VAE roll-back | MQ-VAE‡ | MQ-VAE k = 2 | "
              "MQ-VAE k = 4 |", "|---|---|---|---|---|---|---|---|---|"]
    for shape, st in result["step_time"].items():
        m, r = st["median_s"], st["ratio_to_vqvae"]
        lines.append(f"| {shape} {tuple(st['input_shape'])} | {st['batch_size']} | {m['vqvae']:.4f} | "
                     + " | ".join(f"{r[mode]:.2f}x" for mode in MODES[1:]) + " |")
    switches = result.get("switches") or {}
    if "skipped" in switches:
        lines += ["", f"Speed switches: not measured ({switches['skipped']})."]
    elif switches:
        lines += ["", "Speed switches at the paper shape, step time relative to fp32 (`switches`):", "",
                  "| switches | " + " | ".join(MODES) + " | slower than fp32 |", "|---|" + "---|" * (len(MODES) + 1)]
        for name, st in switches.items():
            lines.append(f"| {name} | " + " | ".join(f"{st['ratio_to_fp32'][mode]:.2f}x" for mode in MODES)
                         + f" | {', '.join(st['slower_than_fp32']) or 'none'} |")
    lines += ["", "Operations dispatched per iteration (`operations_per_iteration`):", "",
              "| shape | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for shape, st in result["step_time"].items():
        lines.append(f"| {shape} | " + " | ".join(f"{st['operations_per_iteration'][mode]:g}" for mode in MODES) + " |")
    phases = result["step_time"]["digits"]["phases_ms"]
    if phases:
        names = sorted({name for mode in MODES for name in phases[mode]} - {"iteration"})
        lines += ["", "Where the time goes (digits, ms per iteration under torch.profiler; an upper level's backward "
                      "includes its hypergradient):", "",
                  "| phase | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
        for name in ["iteration", *names]:
            cells = [f"{phases[mode][name]:.2f}" if name in phases[mode] else "" for mode in MODES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| N | K | D | chunked vec/s | chunked peak MiB | naive vec/s | naive peak MiB |", "|---|---|---|---|---|---|---|"]
    rows = result["nn_search"]["rows"]
    for i in range(0, len(rows), 2):
        c, n = rows[i], rows[i + 1]

        def cell(row):
            if row["status"] != "ok":
                return row["status"], "-"
            return f"{row['vectors_per_s']:.3g}", f"{row['peak_extra_mib']:.1f}"

        lines.append(f"| 2^{c['N'].bit_length() - 1} | {c['K']} | {c['D']} | {' | '.join(cell(c))} | {' | '.join(cell(n))} |")
    f = result["finite_check"]
    lines += ["", f"Finiteness flag (digits VQ-VAE, batch {f['batch_size']}): {1e6 * f['flag_update_s']:.1f} µs per step, "
              f"{100 * f['flag_update_fraction_of_step']:.3f}% of a {1e3 * f['step_s']:.2f} ms step; its host sync "
              f"({1e6 * f['check_s']:.1f} µs) runs only at logging steps and before checkpoints. Zero-gradient counter: "
              f"{1e6 * f['zero_gradient_update_s']:.1f} µs per optimizer step, "
              f"{100 * f['zero_gradient_update_fraction_of_step']:.3f}% of that step."]
    parallel = result.get("data_parallel")
    if parallel:
        cells = "; ".join(f"{mode} {1e3 * row['ranks']['median_s']:.2f} ms with {row['ranks']['ranks']} ranks x "
                          f"{row['ranks']['batch_per_rank']}, {1e3 * row['one_process']['median_s']:.2f} ms in one process "
                          f"x {row['one_process']['batch_per_rank']} ({row['ratio_ranks_to_one_process']:.2f}x)"
                          for mode, row in parallel["modes"].items())
        lines += ["", f"Data-parallel (digits, global batch {parallel['global_batch']}, gloo on this CPU): {cells}."]
    t = result["time_to_quality"]
    median = t["median_ratio_to_vqvae_time"]
    cells = ", ".join(f"seed {row['seed']} " + ("never reached" if row["ratio_to_vqvae_time"] is None
                                                else f"{row['ratio_to_vqvae_time']:.2f}x") for row in t["per_seed"])
    lines += ["", f"Time to quality (digits, {t['config']['iters']} it, {len(t['per_seed'])} seeds): MQ-VAE reached "
              f"VQ-VAE's final test MSE in {t['seeds_reached']} of {len(t['per_seed'])} seeds; median time relative to "
              f"VQ-VAE's: {t['median_ratio_to_vqvae_time_reason'] if median is None else f'{median:.2f}x'} ({cells})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--dp-worker":
        mode, batch_size, warmup, rounds, configs = argv[1:6]
        result = data_parallel_worker(mode, int(batch_size), int(warmup), int(rounds), Path(configs))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return 0
    if argv and argv[0] == "--nn-worker":
        method, n, k, d, device, min_time = argv[1:7]
        print(json.dumps(nn_worker(method, int(n), int(k), int(d), device, float(min_time))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m engines.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench.json", help="JSON output file (default: bench.json)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations and a reduced search grid (time to quality: 150 iterations, still every seed)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the time-to-quality runs (default: 0 1 2)")
    parser.add_argument("--configs", type=Path, default=CONFIGS,
                        help=f"folder of the modes' vqvae.yaml, alt.yaml and mqvae.yaml (default: {CONFIGS}, "
                             "relative to the working folder)")
    parser.add_argument("--operations", action="store_true",
                        help="only count the operations an iteration of each mode dispatches (digits and paper shape, "
                             "the batches of a full run), print them as JSON and write nothing; no timing")
    args = parser.parse_args(argv)
    missing = [name for name in ("vqvae.yaml", "alt.yaml", "mqvae.yaml") if not (args.configs / name).is_file()]
    if missing:
        parser.error(f"--configs {args.configs}: no {', '.join(missing)} there (run from the repository root, or name "
                     "the folder of the digits configs)")
    if args.operations:
        print(json.dumps(operations_report(args.configs), indent=1))
        return 0
    result = run_bench(args.quick, None if args.seeds is None else {"ttq_seeds": args.seeds}, args.configs)
    write_json(Path(args.out), result)
    print(summary(result))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
