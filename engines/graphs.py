"""``perf.cuda_graphs``: the training iteration captured as CUDA graphs and replayed.

A digits iteration is hundreds of small kernels whose launches cost the host more time than the GPU spends on them;
a CUDA graph replays all of an iteration's kernels from one launch. A graph replays the same kernels, with the same
arguments, on the same memory, and runs no Python. So the iteration must

- keep no host synchronisation (``tests/test_host_sync.py``);
- read and write the same memory every time: the state it carries to the next iteration is updated in place
  (``Level._note_gradient``, ``LevelEngine.note_finite``, the records of the tentative steps), its batches are
  copied into static slots before it (``problems.base.StagedBatches``), and every number that changes between
  iterations is a device tensor: each lr (``mqvae.method.optim.DeviceSchedule``), xi (copied from the lr in
  place), eps = alpha / ||v|| (already one); the optimizers are capturable;
- run the same Python control flow. The Python (Betty's counters, the levels' windows, the schedules' step counts)
  runs only while a graph is captured. The iteration's control flow repeats with a ``period`` of iterations (the
  levels' windows: gradient accumulation x unrolled steps, up the chain of levels), so one graph is captured per
  phase of the period. After each replay the Python state of the levels, their optimizers, schedules and modules is
  set to what the iteration would have left (``PythonState``): the state the capture of its phase left, with its
  integer counters advanced by whole periods, and its references (e.g. to the latest losses) to what that capture
  made. Before capturing, the runner checks this model: the states of an eager window and of the capture window may
  differ in integer counters only, or the run stops with one line naming what else changed.

``tests/test_cuda_graphs.py`` checks the last two on the CPU, for every mode: two periods of iterations dispatch the
same operators, with the same host numbers, on the same memory wherever the memory comes from outside the iteration,
and no tensor is read by a later window than the one that made it; the Python state follows the model; and this
runner, on a CPU stand-in for CUDA graphs, gives the eager run bit for bit. Drawing the batches, quantizer
maintenance, logging, evaluation and checkpoints stay outside the graphs.
"""

from __future__ import annotations

import math

import torch

from mqvae.errors import UserError
from mqvae.method.hypergradients import WATCHED_STEPS
from mqvae.method.optim import DeviceSchedule
from problems.base import StagedBatches

# Eager iterations before the eager window of the model check: at least 3 (torch's advice: lazy initialisation,
# cuDNN's autotuning and the optimizers' state happen outside the capture), and each upper level's first
# WATCHED_STEPS hypergradients, whose check ends in them (mqvae.method.hypergradients.run_method).
WARMUP_PERIODS = WATCHED_STEPS + 1
# Attributes that the batch draws change, which run outside the graphs (Betty's epoch count per stream).
DRAWN = frozenset({"epoch_counter"})


def level_period(level) -> int:
    """Iterations after which a level's steps repeat: its own window (Betty's unroll steps x gradient accumulation)
    times the period of the levels below it, after each window of which it steps once."""
    below = [level_period(child) for child in level._children]
    return level._unroll_steps * level.gas * (math.lcm(*below) if below else 1)


def iteration_period(engine) -> int:
    return math.lcm(*(level_period(p) for p in engine.problems))


def eager_window(engine, first_step: int) -> int:
    """The window whose Python state the capture window after it is checked against, for a run whose first
    iteration in this process is ``first_step``: the first whole window after WARMUP_PERIODS periods of warm-up and
    after every level's ``periodic_from``."""
    period = iteration_period(engine)
    start = max(first_step + WARMUP_PERIODS * period, *(p.periodic_from() for p in engine.problems))
    return -(-(start - 1) // period)  # the first window that starts at or after start


def make_graph_safe(engine) -> None:
    """Turn ``engine``'s levels graph-safe (see the module docstring): static batch slots, schedules on the device,
    the losses' finiteness folded every iteration; on CUDA, capturable optimizers. Also what the CPU test runs."""
    engine.finite_fold = 1
    for p in engine.problems:
        if p.data != "shared":
            p.staged = StagedBatches(p)
        if p.scheduler is not None and not isinstance(p.scheduler, DeviceSchedule):
            # (No level's schedule steps more often than once per iteration on average.)
            p.scheduler = DeviceSchedule(p.scheduler, engine.cfg.train.iters)
        if engine.device.type == "cuda":
            for group in p.optimizer.param_groups:
                group["capturable"] = True
            # (torch warns once when a capturable optimizer steps uncaptured: the warm-up iterations do, by design.)
            p.optimizer._warned_capturable_if_run_uncaptured = True


# -- the Python state of an iteration ----------------------------------------------------------------------

def _scalar(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_scalar(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _owners(engine):
    """(name, object) of everything whose Python attributes an iteration may change: the levels, their schedules
    and optimizers (and param groups, dicts), and every module of the model, each once."""
    seen = set()

    def once(name, obj):
        if obj is not None and id(obj) not in seen:
            seen.add(id(obj))
            yield name, obj

    for p in engine.problems:
        yield from once(p.name, p)
        schedule = p.scheduler
        yield from once(f"{p.name}.scheduler", schedule)
        if isinstance(schedule, DeviceSchedule):
            yield from once(f"{p.name}.scheduler.scheduler", schedule.scheduler)
        yield from once(f"{p.name}.optimizer", p.optimizer)
        for i, group in enumerate(p.optimizer.param_groups):
            yield from once(f"{p.name}.optimizer.param_groups[{i}]", group)
        yield from once(f"{p.name}.fast_roll_back", p.fast_roll_back)
        for name, module in p.model.named_modules():
            yield from once(f"model.{name}" if name else "model", module)


class PythonState:
    """The Python attributes of ``_owners``, by ``owner.attribute``, with the objects to write them back to: the
    scalar ones by value (numbers, strings, flags, tuples of them: ``values``), the others by reference (``refs``:
    e.g. a level's ``last_stats``, the dict of its latest losses, which each captured phase makes anew in its own
    graph's memory, and which a replay of that phase must point to again)."""

    def __init__(self, engine):
        self.values: dict[str, object] = {}
        self.refs: dict[str, object] = {}
        self.targets: dict[str, tuple[object, str]] = {}
        for owner, obj in _owners(engine):
            items = obj.items() if isinstance(obj, dict) else vars(obj).items()
            for attr, value in items:
                if attr in DRAWN:
                    continue
                key = f"{owner}.{attr}"
                self.targets[key] = (obj, attr)
                if _scalar(value):
                    self.values[key] = tuple(value) if isinstance(value, list) else value
                else:
                    self.refs[key] = value

    def set(self, key: str, value) -> None:
        """Write ``value`` (a list where the attribute holds one) to ``key``'s attribute."""
        obj, attr = self.targets[key]
        if isinstance(obj, dict):
            obj[attr] = value
        else:
            setattr(obj, attr, list(value) if isinstance(getattr(obj, attr), list) and key in self.values else value)


def _counter(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def state_changes(before: PythonState, after: PythonState) -> tuple[dict[str, int], list[str]]:
    """Between two windows' states of one phase: the integer counters' advance per window (nonzero ones), and what
    else differs (each ``key: before -> after``), which a replay could not reproduce."""
    advance, other = {}, []
    for key in sorted(before.values.keys() | after.values.keys()):
        a, b = before.values.get(key, "<absent>"), after.values.get(key, "<absent>")
        if a == b and type(a) is type(b):
            continue
        if _counter(a) and _counter(b):
            advance[key] = b - a
        else:
            other.append(f"{key}: {a!r} -> {b!r}")
    return advance, other


class PhaseState:
    """What a replay of one phase leaves in Python: ``state`` (the capture window's) with ``advance`` added per
    window after the capture. ``keys``: the values to write back, the counters and whatever differs from the phase
    before's (``previous``). ``ref_keys``: the references that the capture of this phase rebound (that differ from
    ``before``, the state its capture started from); a reference that it left alone is the one an earlier phase
    made, which the replays keep current."""

    def __init__(self, state: PythonState, advance: dict[str, int], previous: PythonState, before: PythonState):
        self.state, self.advance = state, advance
        self.keys = sorted(set(advance) | {key for key, value in state.values.items()
                                           if previous.values.get(key, "<absent>") != value})
        self.ref_keys = sorted(key for key, value in state.refs.items() if before.refs.get(key) is not value)

    def apply(self, windows: int) -> None:
        for key in self.keys:
            value = self.state.values[key]
            self.state.set(key, value + windows * self.advance[key] if key in self.advance else value)
        for key in self.ref_keys:
            self.state.set(key, self.state.refs[key])


# -- capture and replay -----------------------------------------------------------------------------------

class IterationGraphs:
    """The runner: eager iterations (on a side stream, as torch's capture wants) until the capture window, one graph
    per phase captured there, replays after it. See the module docstring."""

    def __init__(self, engine):
        self.engine = engine
        self.period = iteration_period(engine)
        self.eager_window: int | None = None  # set at the first iteration
        self.eager_states: dict[int, PythonState] = {}
        self.captured: dict[int, PythonState] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.phases: dict[int, PhaseState] = {}
        self.side = torch.cuda.Stream(engine.device)

    def _window_phase(self, step: int) -> tuple[int, int]:
        return divmod(step - 1, self.period)

    def iteration(self, step: int) -> None:
        window, phase = self._window_phase(step)
        if self.eager_window is None:
            self.eager_window = eager_window(self.engine, step)
        capture_window = self.eager_window + 1
        if window < capture_window:
            self._eager(phase)
            if window == self.eager_window:
                self.eager_states[phase] = PythonState(self.engine)
        elif window == capture_window:
            self._capture(phase)
        else:
            self._stage(phase)
            self.graphs[phase].replay()
            self.phases[phase].apply(window - capture_window)

    def _stage(self, phase: int) -> None:
        for p in self.engine.problems:
            if p.staged is not None:
                p.staged.begin(phase, staged=True)

    def _eager(self, phase: int) -> None:
        for p in self.engine.problems:
            if p.staged is not None:
                p.staged.begin(phase, staged=False)
        self.side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(self.side):
            self.engine.eager_iteration()
        torch.cuda.current_stream(self.engine.device).wait_stream(self.side)

    def _capture(self, phase: int) -> None:
        self._stage(phase)
        graph = torch.cuda.CUDAGraph()
        # On the warm-up's stream, so that what libraries create per stream (cuBLAS workspaces) exists before the
        # capture; thread_local: the data loaders' pinning threads may use CUDA while the capture runs.
        with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
            self.engine.eager_iteration()
        for p in self.engine.problems:
            if p.staged is not None and p.staged.taken != p.staged.counts.get(phase, 0):
                raise UserError(f"perf.cuda_graphs: level '{p.name}' took {p.staged.taken} batches in the captured "
                                f"iteration of phase {phase}, and {p.staged.counts.get(phase, 0)} in the eager one: "
                                "the iteration's control flow is not periodic; run without perf.cuda_graphs")
        graph.replay()  # (the capture ran no kernel: this is the iteration's work)
        self.graphs[phase] = graph
        state = PythonState(self.engine)
        advance, other = state_changes(self.eager_states[phase], state)
        if other:
            raise UserError(f"perf.cuda_graphs: between two iterations of phase {phase} of the period of "
                            f"{self.period} iterations, more than counters changed ({'; '.join(other[:3])}), so a "
                            "replay could not reproduce the iteration; run without perf.cuda_graphs")
        self.captured[phase] = state
        if len(self.captured) == self.period:
            for i in range(self.period):
                self.phases[i] = PhaseState(self.captured[i], state_changes(self.eager_states[i], self.captured[i])[0],
                                            self.captured[(i - 1) % self.period],
                                            self.captured[i - 1] if i else self.eager_states[self.period - 1])
