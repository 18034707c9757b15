"""``perf.cuda_graphs`` (engines.graphs; issue 29, point 4).

On the CPU, where no graph can be captured, what a capture relies on is checked for every mode, on the graph-safe
engine (``make_graph_safe``) that a CUDA run captures:

- **the same work on the same memory**: two periods of iterations dispatch the same operators, with the same host
  numbers (a number that changed would be baked into the graph at its capture-time value), on the same memory
  wherever a tensor comes from outside the iteration (parameters, optimizer state, batch slots, lr); and no tensor
  that one iteration makes is read by a later one (state carried by rebinding a name, which a replay, running no
  Python, would never see rebound). ``IterationRecorder``, a ``TorchDispatchMode``, sees every operator, backward and
  optimizer included.
- **the Python state model** of the replays: the scalar Python state after each phase differs between windows in
  integer counters alone, which advance by the same amount every window.

On CUDA, the runs themselves: graphs against eager, the same parameters to float tolerance after 20 iterations.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engines.experiment import build_engine
from engines.graphs import (IterationGraphs, PythonState, eager_window, iteration_period, make_graph_safe,
                            state_changes)
from helpers import assert_same, assert_same_checkpoints, measured, one_line_error
from mqvae.io.checkpoint import load_checkpoint
from mqvae.config import load_config
from mqvae.method.optim import DeviceSchedule
from test_host_sync import MODES as HOST_SYNC_MODES, TINY

ROOT = Path(__file__).resolve().parents[1]
TORCH = str(Path(torch.__file__).parent)

# Every mode of the host-sync test but Betty's darts (the authors' preset), which perf.cuda_graphs refuses; and
# Gumbel-VQ, whose forward draws noise on the device.
MODES = {**{mode: spec for mode, spec in HOST_SYNC_MODES.items() if mode != "authors"},
         "gumbel": ("gumbel", TINY),
         "authors_accumulating": ("mqvae", [*TINY, "levels.codebook.grad_accumulation=2",
                                            "levels.autoencoder.grad_accumulation=2"])}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class IterationRecorder(TorchDispatchMode):
    """Records each operator an iteration dispatches, with its arguments normalised: a tensor made earlier in the
    same iteration by its maker's position, one from outside by its memory (storage, offset, shape, strides), a
    host number as itself. Tensors made while recording are kept alive, so no memory is reused within the record
    and equal addresses mean the same tensor. ``carried``: reads of a tensor that an iteration of an earlier window
    of ``period`` iterations made."""

    def __init__(self, period: int):
        super().__init__()
        self.period = period
        self.iterations: list[list[tuple]] = []
        self.origins: list[list[str]] = []
        self.carried: list[str] = []
        self._made: dict[int, tuple[int, int]] = {}  # storage -> (iteration, operator position)
        self._alive: list[torch.Tensor] = []
        self.recording = False

    def begin(self) -> None:
        self.iterations.append([])
        self.origins.append([])
        self.recording = True

    def end(self) -> None:
        self.recording = False

    def _arg(self, value, storages: set):
        if torch.is_tensor(value):
            storage = _storage(value)
            storages.add(storage)
            made = self._made.get(storage)
            if made is not None and made[0] == len(self.iterations) - 1:
                return ("made", made[1], tuple(value.shape), value.stride(), value.storage_offset())
            if made is not None:
                # Made by an earlier phase of the same window: in a graph run its graph was captured first, and
                # every replay of it writes the same memory, which its reference keeps from reuse. Made in an
                # earlier window: a replay would read what the eager iteration before the capture left.
                if made[0] // self.period != (len(self.iterations) - 1) // self.period:
                    self.carried.append(f"{self._func} reads a tensor made by iteration {made[0]} at {_origin()}")
                return ("carried", made[0] % self.period, made[1])
            return ("outside", storage, value.storage_offset(), tuple(value.shape), value.stride(), str(value.dtype))
        if isinstance(value, (list, tuple)):
            return tuple(self._arg(v, storages) for v in value)
        if isinstance(value, dict):
            return tuple((k, self._arg(v, storages)) for k, v in sorted(value.items()))
        if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(value)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if not self.recording or name.startswith("profiler."):
            return out
        self._func = name
        storages: set = set()
        entry = (name, self._arg(args, storages), self._arg(kwargs, storages))
        position = len(self.iterations[-1])
        for o in out if isinstance(out, (list, tuple)) else [out]:
            if torch.is_tensor(o) and _storage(o) not in storages:  # (a view or an in-place result is not new)
                self._made[_storage(o)] = (len(self.iterations) - 1, position)
                self._alive.append(o)
        self.iterations[-1].append(entry)
        self.origins[-1].append(_origin())
        return out


def _origin() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.startswith(TORCH) and f.name != "_arg"
              and not f.filename.endswith("test_cuda_graphs.py")]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames[-2:]))


def graph_safe_engine(mode: str, folder: Path, overrides=()):
    name, mode_overrides = MODES[mode]
    cfg = load_config(ROOT / "configs" / "digits" / f"{name}.yaml",
                      [*mode_overrides, "device=cpu", "data.batch_size=16", "train.iters=200", *overrides])
    engine = build_engine(cfg, folder)
    engine.train()
    make_graph_safe(engine)
    return engine


def run_iteration(engine, step: int, staged: bool, recorder: IterationRecorder | None = None) -> None:
    """One iteration as the graph runner runs it (``IterationGraphs``), with the graph's part recorded: the batches
    staged (or drawn inline), the iteration, then quantizer maintenance outside it."""
    engine.global_step = step
    phase = (step - 1) % iteration_period(engine)
    for p in engine.problems:
        if p.staged is not None:
            p.staged.begin(phase, staged)
    if recorder is not None:
        recorder.begin()
    engine.eager_iteration()
    if recorder is not None:
        recorder.end()
    engine.maintain()
    engine.report_level_warnings()


@pytest.mark.parametrize("mode", MODES)
def test_two_periods_replay_the_same_operators_on_the_same_memory(tmp_path, mode):
    engine = graph_safe_engine(mode, tmp_path)
    period = iteration_period(engine)
    first = eager_window(engine, 1)
    recorder = IterationRecorder(period)
    with recorder:
        for step in range(1, (first + 2) * period + 1):
            window = (step - 1) // period
            run_iteration(engine, step, staged=window >= first, recorder=recorder if window >= first else None)
    assert not recorder.carried, "\n".join(recorder.carried[:5])
    assert len(recorder.iterations) == 2 * period
    for phase in range(period):
        one, other = recorder.iterations[phase], recorder.iterations[phase + period]
        assert one, f"phase {phase}: no operator recorded"
        differing = [i for i, (a, b) in enumerate(zip(one, other)) if a != b]
        where = [f"{one[i][0]} at {recorder.origins[phase][i]}:\n  {str(one[i][1:])[:400]}\n  {str(other[i][1:])[:400]}"
                 for i in differing[:4]]
        assert len(one) == len(other) and not differing, (
            f"mode {mode}, phase {phase} of {period}: {len(one)} and {len(other)} operators, {len(differing)} differ:\n"
            + "\n".join(where))


@pytest.mark.parametrize("mode", MODES)
def test_the_python_state_advances_by_counters_alone(tmp_path, mode):
    """After each phase, the scalar Python state of three successive windows: what differs is integer counters
    alone, each advancing by the same amount per window (``PhaseState``'s model of a replay)."""
    engine = graph_safe_engine(mode, tmp_path)
    period = iteration_period(engine)
    first = eager_window(engine, 1)
    states: dict[tuple[int, int], PythonState] = {}
    for step in range(1, (first + 3) * period + 1):
        window, phase = divmod(step - 1, period)
        run_iteration(engine, step, staged=window >= first)
        if window >= first:
            states[window - first, phase] = PythonState(engine)
    for phase in range(period):
        advance, other = state_changes(states[0, phase], states[1, phase])
        assert not other, f"mode {mode}, phase {phase}: " + "; ".join(other[:5])
        assert advance, f"mode {mode}, phase {phase}: no counter advanced (the iteration's count at least should)"
        assert state_changes(states[1, phase], states[2, phase]) == (advance, []), mode


def test_the_device_schedule_gives_the_eager_lrs_and_checkpoints_alike(tmp_path):
    """DeviceSchedule against the LambdaLR it wraps, over a warm-up cosine schedule; its state_dict is the
    LambdaLR's at the same step, and loading one sets the lr there."""
    from mqvae.method.optim import LRSchedule

    def optimizer():
        return torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": 0.1},
                                {"params": [torch.zeros(2, requires_grad=True)], "lr": 0.03}])

    multiplier = LRSchedule("warmup_cosine", 30, 0.2, 0.05)
    eager = torch.optim.lr_scheduler.LambdaLR(optimizer(), multiplier)
    device = DeviceSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer(), multiplier), 30)
    for _ in range(35):  # (past the schedule's end: its last value)
        got = [float(g["lr"]) for g in device.optimizer.param_groups]
        want = [g["lr"] for g in eager.optimizer.param_groups]
        assert got == pytest.approx(want, rel=1e-6)
        with warnings.catch_warnings():  # (torch's: the schedule steps with no optimizer step, as here)
            warnings.simplefilter("ignore", UserWarning)
            eager.step()
        device.step()
    state, want = device.state_dict(), eager.state_dict()
    assert state["last_epoch"] == want["last_epoch"] and state["_last_lr"] == pytest.approx(want["_last_lr"])
    fresh = DeviceSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer(), multiplier), 30)
    fresh.load_state_dict(torch.optim.lr_scheduler.LambdaLR(optimizer(), multiplier).state_dict() | {"last_epoch": 7})
    assert float(fresh.optimizer.param_groups[1]["lr"]) == pytest.approx(0.03 * multiplier(7), rel=1e-6)


@pytest.mark.parametrize("setting, needle", [
    (["device=cpu"], "needs a CUDA device"),
    (["perf.compile=true", "device=cuda"], "perf.compile"),
    (["hypergradient.type=darts", "device=cuda"], "darts"),
    (["levels.autoencoder.optimizer=sgd", "levels.autoencoder.weight_decay=0", "device=cuda"], "SGD"),
])
def test_refused_in_one_line(tmp_path, setting, needle):
    one_line_error(lambda: load_config(ROOT / "configs" / "digits" / "mqvae.yaml", ["perf.cuda_graphs=true", *setting]),
                   "perf.cuda_graphs", needle)


def test_a_method_registered_graph_safe_is_accepted(tmp_path):
    from mqvae.method.hypergradients import direct, register_hypergradient

    for name in ("mqvae", "direct"):
        load_config(ROOT / "configs" / "digits" / "mqvae.yaml", ["perf.cuda_graphs=true", "device=cuda",
                                                                 f"hypergradient.type={name}"])
    # One function under two names, registered with other traits: each name keeps what its registration said.
    def same(vector, context):
        return direct(vector, context)

    register_hypergradient("test_graph_safe_direct", same, graph_safe=True, unroll_steps=True)
    register_hypergradient("test_unchecked_direct", same)
    for setting in (["perf.cuda_graphs=true", "device=cuda"], ["hypergradient.unroll_steps=2"]):
        load_config(ROOT / "configs" / "digits" / "mqvae.yaml", [*setting, "hypergradient.type=test_graph_safe_direct"])
    one_line_error(lambda: load_config(ROOT / "configs" / "digits" / "mqvae.yaml", [
        "perf.cuda_graphs=true", "device=cuda", "hypergradient.type=test_unchecked_direct"]), "graph_safe=True")
    one_line_error(lambda: load_config(ROOT / "configs" / "digits" / "mqvae.yaml", [
        "hypergradient.unroll_steps=2", "hypergradient.type=test_unchecked_direct"]), "unroll_steps=True")


def test_refused_on_the_cpu_when_the_device_is_auto(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device: device auto is CUDA here")
    cfg = load_config(ROOT / "configs" / "digits" / "mqvae.yaml", ["perf.cuda_graphs=true"])
    one_line_error(lambda: build_engine(cfg, tmp_path / "run"), "perf.cuda_graphs", "needs a CUDA device")
    assert not (tmp_path / "run").exists()


# -- the runner, on a CPU stand-in for CUDA graphs ----------------------------------------------------------

def _tensors(value) -> list:
    return [t for t in tree_leaves(value) if torch.is_tensor(t)]


class StandInGraph:
    """A CUDA graph's semantics on the CPU: capture records every operator the iteration dispatches, with the very
    tensors it read and made; a replay calls the same operators on the same tensors, runs no Python, and writes each
    new result into the tensor the capture made, so later operators, and whoever kept a reference, read it there.
    Unlike CUDA's, the capture has already done the iteration's work, so the replay that follows it
    (``IterationGraphs._capture``) does nothing."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        if self.replays == 1:
            return
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                for old, fresh in zip(_tensors(out), _tensors(new)):
                    if fresh is not old:
                        old.copy_(fresh)


class _Capture(TorchDispatchMode):
    def __init__(self, graph: StandInGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not str(func).startswith("profiler."):
            self.graph.ops.append((func, args, kwargs, out))
        return out


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def stand_in_cuda_graphs(monkeypatch) -> None:
    """torch.cuda's graph and stream calls that ``IterationGraphs`` makes, answered on the CPU."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kwargs: _Capture(graph))


def _stand_in_run(mode: str, folder: Path, replay: bool):
    """A run of ``mode`` with the graph runner, to (eager_window + 4) periods: its graphs replayed on the stand-in,
    or (``replay`` false) every iteration eager, as the runner runs its warm-up."""
    probe = graph_safe_engine(mode, folder / "probe")
    iters = (eager_window(probe, 1) + 4) * iteration_period(probe)
    engine = graph_safe_engine(mode, folder / "run", [f"train.iters={iters}", "train.log_every=3",
                                                      f"train.eval_every={iters}", f"train.checkpoint_every={iters}"])
    (folder / "run").mkdir(parents=True, exist_ok=True)
    engine.write_config()
    engine.graphs = IterationGraphs(engine)
    if not replay:
        engine.graphs.eager_window = iters  # (never reached: no capture)
    engine.run()
    return engine


@pytest.mark.parametrize("mode", MODES)
def test_the_runner_replays_the_eager_run_on_a_cpu_stand_in(tmp_path, monkeypatch, mode):
    """``IterationGraphs`` itself (warm-up, the checked eager window, one capture per phase, replays with the Python
    state advanced, batches staged) against the same graph-safe engine run eagerly: the same parameters, optimizer
    and schedule state, step counts, streams and logged numbers, bit for bit, replays included."""
    stand_in_cuda_graphs(monkeypatch)
    graphs = _stand_in_run(mode, tmp_path / "graphs", replay=True)
    eager = _stand_in_run(mode, tmp_path / "eager", replay=False)
    runner = graphs.graphs
    replayed = [g.replays - 1 for g in runner.graphs.values()]
    assert len(runner.graphs) == runner.period and min(replayed) >= 2, replayed
    assert eager.graphs.graphs == {}
    for key, value in eager.model.state_dict().items():
        assert torch.equal(graphs.model.state_dict()[key], value), (mode, key)
    assert_same_checkpoints(graphs.run_dir, eager.run_dir)  # (levels, optimizers, schedules, progress)
    assert graphs.state_dict()["streams"] == eager.state_dict()["streams"], mode
    for p, q in zip(graphs.problems, eager.problems):
        assert (p._count, p.ready) == (q._count, q.ready), (mode, p.name)
    records = [{k: v for k, v in r.items() if k != "time_s"} for r in measured(graphs.run_dir)]
    assert records == [{k: v for k, v in r.items() if k != "time_s"} for r in measured(eager.run_dir)], mode


def _resumable_run(folder: Path, iters: int, every: int, graphs: bool, checkpoint: Path | None = None):
    """MQ-VAE (warm-up cosine schedules) to ``iters``, a checkpoint every ``every`` iterations; with the graph runner
    on the stand-in or plainly eager; resumed from ``checkpoint`` if given."""
    overrides = [f"train.iters={iters}", "train.log_every=3", "train.eval_every=0", f"train.checkpoint_every={every}",
                 "levels.autoencoder.scheduler=warmup_cosine", "levels.autoencoder.warmup_ratio=0.3"]
    if graphs:
        engine = graph_safe_engine("mqvae", folder, overrides)
        engine.graphs = IterationGraphs(engine)
    else:
        name, mode_overrides = MODES["mqvae"]
        engine = build_engine(load_config(ROOT / "configs" / "digits" / f"{name}.yaml",
                                          [*mode_overrides, "device=cpu", "data.batch_size=16", *overrides]), folder)
        engine.train()
    folder.mkdir(parents=True, exist_ok=True)
    engine.write_config()
    if checkpoint is not None:
        engine.load_state_dict(load_checkpoint(checkpoint), str(checkpoint))
    engine.run()
    return engine


def test_a_graph_run_resumes_exactly_and_checkpoints_cross_modes(tmp_path, monkeypatch):
    """A graph run (on the stand-in) resumed from its checkpoint ends where the run without the stop ends, bit for
    bit; an eager checkpoint resumes under graphs and a graph checkpoint in eager mode, each lr then the schedule's
    at the step, held as that mode holds it (a device tensor that DeviceSchedule refills; a number)."""
    stand_in_cuda_graphs(monkeypatch)
    iters, every = 30, 18  # (one checkpoint, at 18: the capture at 8, replays from 9; resumed: capture at 26)
    whole = _resumable_run(tmp_path / "whole", iters, every, graphs=True)
    resumed = _resumable_run(tmp_path / "resumed", iters, every, graphs=True, checkpoint=tmp_path / "whole" / "checkpoint.pt")
    assert resumed.global_step == whole.global_step == iters
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    for p, q in zip(resumed.problems, whole.problems):
        assert_same(p.optimizer.state_dict()["state"], q.optimizer.state_dict()["state"], p.name)
        assert p.optimizer.param_groups[0]["lr"] is p.scheduler.lrs[0]  # (what DeviceSchedule refills is what is read)
    eager = _resumable_run(tmp_path / "eager", iters, every, graphs=False)
    into_graphs = _resumable_run(tmp_path / "into_graphs", iters, every, graphs=True,
                                 checkpoint=tmp_path / "eager" / "checkpoint.pt")
    into_eager = _resumable_run(tmp_path / "into_eager", iters, every, graphs=False,
                                checkpoint=tmp_path / "whole" / "checkpoint.pt")
    for engine in (into_graphs, into_eager):
        level = next(p for p in engine.problems if p.name == "autoencoder")
        want = level.scheduler.get_last_lr()[0]  # (the LambdaLR's value at the last step, in either mode)
        lr = level.optimizer.param_groups[0]["lr"]
        assert engine.global_step == iters and level.scheduler.last_epoch == eager.problems[1].scheduler.last_epoch
        if engine is into_graphs:
            assert lr is level.scheduler.lrs[0] and float(lr) == pytest.approx(want, rel=1e-6)
        else:
            assert isinstance(lr, float) and lr == pytest.approx(want, rel=1e-12)


# -- on CUDA --------------------------------------------------------------------------------------------------

def _cuda_run(mode: str, folder: Path, graphs: bool, iters: int):
    name, overrides = MODES[mode]
    cfg = load_config(ROOT / "configs" / "digits" / f"{name}.yaml",
                      [*overrides, "device=cuda", "data.batch_size=16", f"train.iters={iters}",
                       f"train.log_every={iters}", "train.eval_every=0", "train.checkpoint_every=0",
                       f"perf.cuda_graphs={str(graphs).lower()}"])
    folder.mkdir(parents=True)
    engine = build_engine(cfg, folder)
    engine.write_config()
    engine.run()
    return engine


# Modes whose forward draws random numbers replay them from the graph's own offsets into the generator, so they
# need not match eager mode's draws; they are run (capture and replay must work) but not compared.
RANDOM_MODES = {"gumbel"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: perf.cuda_graphs captures and replays CUDA "
                    "graphs; on the CPU it is refused (test_refused_on_the_cpu_when_the_device_is_auto)")
@pytest.mark.parametrize("mode", MODES)
def test_graphs_give_the_eager_parameters_on_cuda(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    graphs = _cuda_run(mode, tmp_path / "graphs", True, 20)
    runner = graphs.graphs
    iters = 20
    if len(runner.phases) != runner.period or (iters - 1) // runner.period <= runner.eager_window + 1:
        # (a long period: run until a whole window is replayed)
        iters = (runner.eager_window + 3) * runner.period
        graphs = _cuda_run(mode, tmp_path / "graphs_long", True, iters)
        runner = graphs.graphs
    assert len(runner.graphs) == runner.period, "no graph was captured"
    eager = _cuda_run(mode, tmp_path / "eager", False, iters)
    assert graphs.global_step == eager.global_step == iters
    if mode in RANDOM_MODES:
        return
    got, want = graphs.model.state_dict(), eager.model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4, msg=lambda m: f"{mode}, {key}: {m}")
    for p, q in zip(graphs.problems, eager.problems):
        assert p._count == q._count, (mode, p.name)
        if q.scheduler is not None:
            assert p.scheduler.state_dict()["last_epoch"] == q.scheduler.state_dict()["last_epoch"], (mode, p.name)


def test_the_switches_measured_slower_are_said_on_cuda_alone():
    from mqvae.config.schema import PerfConfig
    from mqvae.runtime.perf import perf_warnings

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert perf_warnings(PerfConfig(bf16=True, compile=True), cpu) == []
    assert perf_warnings(PerfConfig(), cuda) == []
    bf16 = perf_warnings(PerfConfig(bf16=True), cuda)
    assert len(bf16) == 1 and "perf.bf16 without perf.cuda_graphs" in bf16[0]
    assert perf_warnings(PerfConfig(bf16=True, cuda_graphs=True), cuda) == []
    assert ["perf.compile" in w for w in perf_warnings(PerfConfig(compile=True), cuda)] == [True]
