"""Small configs and engines shared by the tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import mqvae.data
from engines.engine import LevelEngine
from engines.experiment import build_engine
from mqvae.config import config_from_dict
from mqvae.io.files import read_lines

TINY_MODEL = {"kind": "vqvae", "hidden_channels": 8, "res_channels": 4, "num_res_blocks": 1, "downsample": 2}
TINY_QUANTIZER = {"num_codes": 16, "dim": 4, "beta": 0.25}


# The plain-torch references' pieces (tests/test_ddagger.py, tests/test_unroll.py). The iteration is what they
# compare; k-means and its warm-up (seconds, in float64) only choose the start, so they start from random codes.
RANDOM_START = {"kmeans_init": False, "kmeans_warmup": 0}


def enc_dec(model):
    """The encoder-decoder's parameters, in the order the AutoEncoder level trains them."""
    return list(model.encoder.parameters()) + list(model.decoder.parameters())


def grads(loss, params):
    """The gradient of ``loss`` with respect to each of ``params``; zeros where it does not reach one."""
    return [torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


def step(optimizer, params, gradient):
    """One optimizer step on the given gradient."""
    for p, g in zip(params, gradient):
        p.grad = g.clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def is_base_config(path) -> bool:
    """A config that experiments inherit (``base:``) and that runs nothing on its own: by the repository's naming,
    ``base.yaml`` or ``*_base.yaml``."""
    name = Path(path).name
    return name == "base.yaml" or name.endswith("_base.yaml")


# The optimizer settings the plain-torch references of the tests are written for: no weight decay, a constant lr
# (the shipped defaults add both, configs/digits/base.yaml).
PLAIN = {"weight_decay": 0.0, "scheduler": "constant"}


def two_levels(codebook_lr=1e-2, autoencoder_lr=1e-2, optimizer="adam"):
    return [
        {"name": "codebook", "problem": "Codebook", "optimizer": optimizer, "lr": codebook_lr, **PLAIN,
         "lower": ["autoencoder"]},
        {"name": "autoencoder", "problem": "AutoEncoder", "optimizer": optimizer, "lr": autoencoder_lr, **PLAIN},
    ]


def tiny_config(levels=None, hypergradient=None, model=None, quantizer=None, **top):
    """A small digits config; ``model`` adds to the tiny VQ-VAE's keys, or with another ``kind`` replaces them (a
    kind is refused the keys it does not read)."""
    model = model or {}
    data = {
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 16},
        "model": {**TINY_MODEL, **model} if model.get("kind", "vqvae") == "vqvae" else model,
        "quantizer": {**TINY_QUANTIZER, **(quantizer or {})},
        "levels": levels if levels is not None else two_levels(),
        "hypergradient": hypergradient or {},
        "train": {"iters": 2, "log_every": 1},
        **top,
    }
    return config_from_dict(data, "<test>")


def tiny_engine(tmp_path, **kwargs):
    cfg = tiny_config(**kwargs)
    return build_engine(cfg, tmp_path)


def results(metrics: dict) -> dict:
    """A metrics.json without what differs between two runs of one config on one machine: the wall time and the
    start time of the process that made it (``provenance``)."""
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "provenance")}


def measured(run_dir) -> list[dict]:
    """log.jsonl's training and evaluation records without what differs between two runs of one config on one
    machine: the training time (``time_s``); warning records left out (a library warns once per process)."""
    return [{k: v for k, v in record.items() if k != "time_s"} for record in read_lines(Path(run_dir) / "log.jsonl")
            if "warning" not in record]


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimizer_snapshot(optimizer) -> dict:
    return copy.deepcopy(optimizer.state_dict())


def interrupt_at(monkeypatch, step: int):
    """Make ``LevelEngine.train_step`` raise KeyboardInterrupt (a Ctrl-C) when the run reaches iteration ``step``;
    returns the function that puts ``train_step`` back."""
    original = LevelEngine.train_step

    def interrupted(self):
        if self.global_step == step:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(LevelEngine, "train_step", interrupted)
    return lambda: monkeypatch.setattr(LevelEngine, "train_step", original)


@pytest.fixture
def float64(monkeypatch):
    """float64 parameters, and the digits as float64 images under ``data.name: digits64``."""
    registry = mqvae.data.DATASETS  # conftest's registries_put_back removes the name afterwards

    def digits64(root, download, seed):
        sets = registry["digits"](root, download, seed)
        double = [TensorDataset(part.tensors[0].double(), part.tensors[1]) for part in (sets.train, sets.test)]
        return mqvae.data.Datasets(*double, sets.channels, sets.image_size, sets.num_classes)

    registry.add("digits64", digits64)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def killed_after_first_save(args: list) -> str:
    """A Python program that runs ``run.py`` with ``args`` and dies by SIGKILL right after its first checkpoint is
    written (``python -c`` it from the repository root)."""
    return ("import os, signal, sys\n"
            "sys.path[0] = os.getcwd()  # as `python run.py` has it, so that warnings name the same files\n"
            "import run\n"
            "from engines.engine import LevelEngine\n"
            "save = LevelEngine.save\n"
            "def save_then_die(self):\n"
            "    save(self)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "LevelEngine.save = save_then_die\n"
            f"sys.exit(run.main({[str(a) for a in args]!r}))\n")


def assert_same(got, want, where):
    """Nested dicts, lists and tensors equal bit for bit (a checkpoint's parts)."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}.{i}")
    else:
        assert got == want, where


class StandInVGG(torch.nn.Module):
    """A stand-in for LPIPS's VGG-16 (whose pretrained weights cannot be downloaded here): five feature maps with
    VGG-16's channel counts, which LPIPS's linear heads are sized for; 1x1 stride-2 stages keep it cheap at 256 px."""

    def __init__(self):
        super().__init__()
        widths = [3, 64, 128, 256, 512, 512]
        self.stages = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 1, stride=2) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = torch.tanh(stage(x))
            outs.append(x)
        return outs


def stand_in_lpips_vgg(monkeypatch):
    """LPIPS-VGG (torchmetrics' network and its linear heads) with ``StandInVGG`` as its backbone, wherever a config's
    loss.perceptual_weight builds one (``metrics.lpips_vgg``); returns the network."""
    from mqvae.evaluation import metrics

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1)
    network = metrics._lpips_with_backbone(StandInVGG(), net="vgg")
    torch.random.set_rng_state(generator_state)
    monkeypatch.setattr(metrics, "lpips_vgg", lambda download_weights: (network, None))
    return network


def one_line_error(check, *needles) -> str:
    """The message of the UserError ``check()`` raises: one line holding every needle."""
    from mqvae.errors import UserError

    with pytest.raises(UserError) as info:
        check()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def killed_and_resumed(args: list, tmp_path) -> tuple[Path, Path]:
    """``run.py args`` killed by SIGKILL right after its first checkpoint and then resumed, and the same run
    uninterrupted: their folders (killed, reference), each process checked to have ended as it should."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    died = subprocess.run([sys.executable, "-c", killed_after_first_save([*args, "--out", killed])], cwd=root,
                          capture_output=True, timeout=600)
    assert died.returncode == -signal.SIGKILL and (killed / "checkpoint.pt").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["--resume", str(killed)], [*args, "--out", str(reference)]):
        result = subprocess.run([sys.executable, "run.py", *command], cwd=root, capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stderr
    return killed, reference


def assert_same_checkpoints(one, other) -> None:
    """Two run folders' checkpoints hold the same levels, optimizers, schedules and progress, bit for bit."""
    got, want = (torch.load(Path(f) / "checkpoint.pt", weights_only=True) for f in (one, other))
    for part in ("levels", "optimizers", "schedulers", "progress"):
        assert_same(got[part], want[part], part)


def draw(stream, count: int) -> list:
    """``count`` batches as a batch stream hands them out, calling iter() again at each epoch's end, as Betty does."""
    out, iterator = [], iter(stream)
    while len(out) < count:
        try:
            out.append(next(iterator))
        except StopIteration:
            iterator = iter(stream)
    return out
