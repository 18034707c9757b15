"""No host synchronisation in a training iteration that does not log, evaluate or checkpoint (issue 29, point 2).

A read of a device value on the host (``item``, ``bool``, ...) makes the CPU wait until the device has finished all
the work queued before it, so the next iteration's launches cannot overlap this one's kernels. ``LevelEngine.run``
runs per iteration ``train_step``, ``note_finite``, ``maintain``, ``share_batch_norm_statistics`` and
``report_level_warnings``; only at logging steps ``check_finite``, ``check_learning``, ``report_flagged_warnings``
and ``training_record``, at evaluation steps ``evaluation`` (and ``pictures``, ``track_pictures``), at checkpoint
steps ``save``: those may read the device (``OCCASIONAL``).

The trap (``HostSyncTrap``) is armed from the first ``train_step`` of ``run()`` to its end, and disarmed inside the
occasional methods alone: everything else ``run()`` does (its own loop included) is trapped, in every iteration. It
has two nets:

- Python: ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``tolist``, ``numpy`` and
  ``cpu`` record the call and raise;
- operators: a ``TorchDispatchMode`` records the aten operators whose CUDA kernels synchronise (``SYNCING``: a value
  read on the host, an output whose size depends on the data), whoever calls them, C++ included. On the CPU they
  do not wait for anything, but they would on a GPU: this is the CPU's stand-in for
  ``torch.cuda.set_sync_debug_mode("error")``, which the CUDA variant turns on as well and which also sees what
  no operator shows (a copy from pageable host memory, a device-to-host copy).

Known and allowed (``KNOWN``): Betty's own ``darts`` computes its radius as a Python number (``.item()``), which the
authors' preset uses; see the note there.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engines.engine import LevelEngine
from engines.experiment import build_engine
from helpers import measured
from mqvae.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TORCH = str(Path(torch.__file__).parent)

# Tensor methods that read a value on the host.
TRAPPED = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")
# Operators whose CUDA kernels synchronise: reading a value (what item() and bool() dispatch), or sizing the output
# by the data. (repeat_interleave only without output_size, indexing only with a boolean mask: see _syncs.)
SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
           "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive", "aten.bincount",
           "aten.equal", "aten.is_nonzero", "aten.repeat_interleave"}
INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
# What LevelEngine.run calls only at logging, evaluation and checkpoint steps.
OCCASIONAL = ("check_finite", "check_learning", "report_flagged_warnings", "training_record", "evaluation", "pictures",
              "track_pictures", "save")
# Known synchronisations, by the file they happen in, allowed with the reason. Betty's darts (the authors' preset,
# configs/digits/mqvae_authors.yaml) takes eps = alpha / ||v|| as a Python number (betty/hypergradient/darts.py:
# ``R / vector_norm.add_(1e-15).item()``) and hands it to add_(alpha=eps) and div_(2 * eps): with eps a tensor on
# the device those are other kernels (a fused multiply-add; on CUDA, division by a device tensor instead of a
# multiplication by the host scalar's reciprocal), so the run would change in its last bits. It stays Betty's.
KNOWN = {"betty/hypergradient/darts.py": "Betty's darts reads ||v|| on the host"}

ITERS, LOG_EVERY = 6, 3  # trapped iterations 1, 2, 4 and 5; 3 and 6 log, 6 evaluates and checkpoints

TINY = ["model.hidden_channels=8", "model.res_channels=4", "model.num_res_blocks=1"]
# The VQ-GAN's width (it reads no res_channels, tests/test_run.py), its discriminator on from iteration 2.
TINY_VQGAN = ["model.hidden_channels=8", "model.norm_groups=4", "levels.discriminator.params.disc_start=1"]
MODES = {  # id: (config in configs/digits, overrides)
    "vqvae": ("vqvae", TINY),
    "alt": ("alt", TINY),
    "mqvae": ("mqvae", TINY),
    "roll_back": ("mqvae", [*TINY, "hypergradient.roll_back=true"]),
    "alt_inner_steps": ("alt", [*TINY, "hypergradient.inner_steps=2"]),
    "mutual": ("mqvae_ddagger", TINY),
    "unroll_steps_2": ("mqvae", [*TINY, "hypergradient.unroll_steps=2"]),
    # The encoder-decoder steps at iterations 2 and 4, the codebook takes hypergradients at 2 and 4 and steps at 4.
    "authors": ("mqvae_authors", [*TINY, "levels.codebook.grad_accumulation=2",
                                  "levels.autoencoder.grad_accumulation=2"]),
    "three_levels": ("three_levels", TINY),
    "replace": ("replace", [*TINY, "quantizer.replace_freq=2"]),  # codes idle for 2 iterations are replaced
    "affine": ("affine", TINY),
    "affine_ema": ("affine", [*TINY, "quantizer.affine=ema", "quantizer.affine_lr=1.0"]),
    "mqgan": ("mqgan", TINY_VQGAN),
    # The training set as one tensor on the device, batches gathered there by index; and (on CUDA, where auto
    # would choose the device) batches through pinned memory.
    "data_on_device": ("mqvae", [*TINY, "data.on_device=true"]),
    "data_pinned": ("mqvae", [*TINY, "data.on_device=false"]),
}


class HostSync(AssertionError):
    """A host synchronisation in a trapped iteration."""


def _origin(frames) -> str:
    """Where a call came from: the innermost frames outside torch's own Python (``file:line in function``)."""
    outside = [f for f in frames if not f.filename.startswith(TORCH)]
    shown = (outside or list(frames))[-2:]
    return " <- ".join(f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in reversed(shown))


def _short(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "/".join(path.parts[-3:])


def _known(frames) -> str | None:
    return next((reason for f in frames for path, reason in KNOWN.items() if f.filename.endswith(path)), None)


class HostSyncTrap(TorchDispatchMode):
    """Records (and, for the Python net, raises on) host synchronisations while ``armed``; see the module docstring.
    ``cuda``: also ``torch.cuda.set_sync_debug_mode("error")`` while armed."""

    def __init__(self, cuda: bool = False):
        super().__init__()
        self.cuda = cuda
        self.armed = False
        self.calls: list[str] = []  # "what at where"
        self.known: list[str] = []  # allowed ones (KNOWN), with their reason
        self.trapped_steps = 0  # train_step calls while armed

    def arm(self, on: bool) -> None:
        self.armed = on
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error" if on else "default")

    @contextlib.contextmanager
    def disarmed(self):
        was = self.armed
        self.arm(False)
        try:
            yield
        finally:
            self.arm(was)

    def _caught(self, what: str, frames) -> bool:
        """Note a synchronisation; whether it is an unknown one (a failure)."""
        reason = _known(frames)
        (self.known if reason else self.calls).append(f"{what} at {_origin(frames)}" + (f" ({reason})" if reason else ""))
        return reason is None

    def install(self, monkeypatch) -> None:
        for name in TRAPPED:
            original = getattr(torch.Tensor, name)

            def trapped(tensor, *args, _original=original, _name=name, **kwargs):
                if not self.armed:
                    return _original(tensor, *args, **kwargs)
                frames = traceback.extract_stack()[:-1]
                if self._caught(f"Tensor.{_name}", frames):
                    raise HostSync(f"Tensor.{_name} in a trapped iteration at {_origin(frames)}")
                with self.disarmed():  # a known one: let it run (on CUDA, outside the sync debug mode)
                    return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, trapped)
        train_step = LevelEngine.train_step

        def armed_train_step(engine):
            self.arm(True)
            self.trapped_steps += 1
            return train_step(engine)

        monkeypatch.setattr(LevelEngine, "train_step", armed_train_step)
        for name in OCCASIONAL:
            method = getattr(LevelEngine, name)

            def occasional(engine, *args, _method=method, **kwargs):
                with self.disarmed():
                    return _method(engine, *args, **kwargs)

            monkeypatch.setattr(LevelEngine, name, occasional)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed and _syncs(func, args, kwargs):
            self._caught(f"operator {func}", traceback.extract_stack()[:-1])
        return func(*args, **kwargs)


def _syncs(func, args, kwargs) -> bool:
    name = str(func.overloadpacket)
    if name == "aten.repeat_interleave":  # (the Tensor overload: the others are composites of it)
        return kwargs.get("output_size") is None
    if name in INDEXING:
        return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []) if i is not None)
    return name in SYNCING


def trapped_run(engine, monkeypatch, cuda: bool = False) -> HostSyncTrap:
    """``engine.run()`` under a ``HostSyncTrap``; the trap, with what it caught."""
    trap = HostSyncTrap(cuda)
    trap.install(monkeypatch)
    try:
        with trap:
            engine.run()
    except RuntimeError as exc:  # the CUDA sync debug mode's error
        if not (cuda and "synchroniz" in str(exc)):
            raise
        trap.calls.append(f"{exc} at {_origin(traceback.extract_tb(exc.__traceback__))}")
    except HostSync:
        pass  # recorded in trap.calls
    finally:
        trap.arm(False)
    return trap


def mode_engine(mode: str, folder: Path, device: str):
    name, overrides = MODES[mode]
    cfg = load_config(ROOT / "configs" / "digits" / f"{name}.yaml",
                      [*overrides, f"device={device}", "data.batch_size=16", f"train.iters={ITERS}",
                       f"train.log_every={LOG_EVERY}", f"train.eval_every={ITERS}", f"train.checkpoint_every={ITERS}"])
    engine = build_engine(cfg, folder)
    engine.write_config()  # (run_experiment's: the checkpoints go with it)
    return engine


def check_mode(mode: str, tmp_path, monkeypatch, device: str) -> None:
    engine = mode_engine(mode, tmp_path, device)
    trap = trapped_run(engine, monkeypatch, cuda=device == "cuda")
    assert not trap.calls, f"host synchronisations in trapped iterations of mode {mode}:\n" + "\n".join(trap.calls)
    assert trap.trapped_steps == ITERS and engine.global_step == ITERS
    if mode == "authors":  # (Betty's darts: when it goes, KNOWN goes too)
        assert trap.known and all("darts.py" in call for call in trap.known), trap.known
    else:
        assert not trap.known, trap.known


@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_outside_logging_evaluation_and_checkpoints(tmp_path, monkeypatch, mode):
    check_mode(mode, tmp_path, monkeypatch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the same runs on device cuda under "
                    "torch.cuda.set_sync_debug_mode('error'), which sees synchronisations inside torch (a copy from "
                    "pageable memory, a device-to-host copy) that no CPU run shows")
@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_on_cuda(tmp_path, monkeypatch, mode):
    check_mode(mode, tmp_path, monkeypatch, "cuda")


# -- the trap catches what it should, and names where ------------------------------------------------------

def test_the_trap_catches_a_read_in_the_step_and_names_it(tmp_path, monkeypatch):
    from problems.base import Level

    get_loss = Level.get_loss

    def reads_the_loss(level, batch, terms=None):
        loss, stats = get_loss(level, batch, terms)
        float(stats["loss"])  # a host read, as a progress print would make it
        return loss, stats

    monkeypatch.setattr(Level, "get_loss", reads_the_loss)
    trap = trapped_run(mode_engine("vqvae", tmp_path, "cpu"), monkeypatch)
    assert len(trap.calls) == 1 and trap.calls[0].startswith("Tensor.__float__ at tests/test_host_sync.py:"), trap.calls
    assert "in reads_the_loss" in trap.calls[0]


def test_the_trap_catches_an_operator_that_synchronises_on_cuda(tmp_path, monkeypatch):
    maintain = LevelEngine.maintain

    def counts_codes(engine):  # torch.bincount: reads the largest index on the host (on CUDA)
        torch.bincount(engine.encoder_level.last_stats["perplexity"].long().reshape(1))
        maintain(engine)

    monkeypatch.setattr(LevelEngine, "maintain", counts_codes)
    trap = trapped_run(mode_engine("vqvae", tmp_path, "cpu"), monkeypatch)
    assert len(trap.calls) == ITERS, trap.calls  # (in every iteration: maintain is not occasional)
    assert all(call.startswith("operator aten.bincount.default at tests/test_host_sync.py:") for call in trap.calls)


def test_the_logging_evaluation_and_checkpoint_steps_are_not_trapped(tmp_path, monkeypatch):
    """They read the device (training_record's tolist, check_finite's bool, the evaluation's metrics) and are
    not caught; every train_step is trapped, those of the logging iterations too."""
    engine = mode_engine("mqvae", tmp_path, "cpu")
    trap = trapped_run(engine, monkeypatch)
    assert not trap.calls and trap.trapped_steps == ITERS
    assert (tmp_path / "checkpoint.pt").is_file()
    records = measured(tmp_path)
    assert [record["step"] for record in records] == [3, 6, 6] and "test_mse" in records[-1]
