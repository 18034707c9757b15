"""A quiet run: no network unless eval.download_weights asks for it, and a terminal that shows the progress bar and
the summary line only, libraries' warnings going to log.jsonl once each.

The runs are subprocesses of run.py with an empty torch hub cache (TORCH_HOME in tmp_path) and a sitecustomize.py
that makes every name lookup and socket connection fail, and notes it in a file: the only way to tell that a run
made no network attempt, and one that fails at once where a real firewall can make a download hang.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import pytest
import torch

import fake_datasets
import run
from engines import experiment
from engines.engine import LevelEngine
from engines.library_warnings import warning_line
from mqvae.evaluation import metrics
from mqvae.evaluation.metrics import ImageQuality, alexnet_url, cached_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
        "--set", "train.log_every=1", "--set", "device=cpu", "--set", "train.iters=3"]
# 64-px images, which LPIPS's AlexNet can take, so that its weights are looked for (the digits are too small).
IMAGES = ["--set", "data.name=image_folder", "--set", "data.batch_size=4"]

SITECUSTOMIZE = '''
import os, socket

def _refused(*args, **kwargs):
    with open(os.environ["QUIET_TEST_NETWORK_LOG"], "a") as log:
        log.write(repr(args[1:] if args and isinstance(args[0], socket.socket) else args) + "\\n")
    raise ConnectionRefusedError("network use in a test run")

socket.getaddrinfo = _refused
socket.socket.connect = _refused
socket.socket.connect_ex = _refused
'''

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


@pytest.fixture
def offline(tmp_path):
    """Environment of a run with an empty torch hub cache and no network; ``offline.attempts()`` lists the tries."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "QUIET_TEST_NETWORK_LOG": str(tmp_path / "network.log"),
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_HUB", None)
    fake_datasets.write_image_folder(tmp_path / "images", 4)

    class Offline:
        environ = env
        images = ["--set", f"data.root={tmp_path / 'images'}", *IMAGES]
        checkpoints = tmp_path / "torch" / "hub" / "checkpoints"

        @staticmethod
        def attempts() -> list[str]:
            log = tmp_path / "network.log"
            return log.read_text().splitlines() if log.exists() else []

    return Offline


def run_quiet(offline, out: Path, *args):
    return subprocess.run([sys.executable, "run.py", "configs/digits/mqvae.yaml", *TINY, *args, "--out", str(out)],
                          cwd=ROOT, env=offline.environ, capture_output=True, text=True, timeout=600)


def test_the_network_patch_sees_an_attempt(offline, tmp_path):
    # The proof below is only as good as the patch: a download attempt through urllib is noted, and fails at once.
    code = "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/models/x.pth', timeout=5)"
    result = subprocess.run([sys.executable, "-c", code], env=offline.environ, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "URLError" in result.stderr
    assert offline.attempts()


def test_a_default_run_makes_no_network_attempt_and_prints_one_line(offline, tmp_path):
    out = tmp_path / "run"
    result = run_quiet(offline, out, *offline.images)
    assert result.returncode == 0, result.stderr
    assert offline.attempts() == []
    assert "Downloading" not in result.stdout + result.stderr
    # Without a terminal: no progress bar, no library warning, and the summary line alone.
    assert result.stderr == ""
    assert result.stdout.splitlines() == [result.stdout.strip()] and result.stdout.startswith(f"{out}: ")
    m = json.loads((out / "metrics.json").read_text())
    for name in ("fid", "is", "lpips"):
        assert m[name] is None, name
    assert m["lpips_reason"] == (f"LPIPS AlexNet weights not in the local cache ({offline.checkpoints / ALEXNET_FILE}); "
                                 "set eval.download_weights: true to fetch them")
    for name in ("fid", "is"):
        expected = "weights not in the local cache" if FIDELITY else "No module named 'torch_fidelity'"
        assert expected in m[f"{name}_reason"], m[f"{name}_reason"]


def test_on_a_terminal_only_the_progress_bar_and_the_summary_line_show(offline, tmp_path):
    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: run.py with the pseudo-terminal as stdin, stdout and stderr
        # A new pseudo-terminal is 0 columns wide, in which tqdm draws an empty bar.
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "run.py", "configs/digits/mqvae.yaml", *TINY, "--out", str(out)],
                  offline.environ)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, text
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith(f"{out}: ")]
    assert len(summary) == 1, text
    # Numbers only: the per-group lists (rate_bits' companions) stay in metrics.json.
    assert "rate_bits 7" in summary[0] and "per_group" not in summary[0], summary
    # Everything else is tqdm's bar, named after the run folder: "run: 100%|...| 3/3 [...]".
    bars = [line for line in lines if line not in summary]
    assert bars and all(f"{out.name}:" in line and "/3" in line for line in bars), text
    assert "warning" not in text.lower() and "Downloading" not in text


def test_download_weights_tries_the_network_and_a_failure_is_a_null_with_a_reason(offline, tmp_path):
    out = tmp_path / "run"
    result = run_quiet(offline, out, *offline.images, "--set", "eval.download_weights=true")
    assert result.returncode == 0, result.stderr
    assert offline.attempts(), "no download was attempted"
    assert result.stderr == "" and "Downloading" not in result.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["lpips"] is None
    reason = m["lpips_reason"]
    assert reason.startswith(f"LPIPS AlexNet weights not cached ({offline.checkpoints / ALEXNET_FILE}) and not "
                             "downloadable: URLError") and "\n" not in reason
    assert not (offline.checkpoints / ALEXNET_FILE).exists()  # no partial file left to be taken for the weights


def test_image_quality_off_computes_nothing_and_says_so(offline, tmp_path):
    out = tmp_path / "run"
    result = run_quiet(offline, out, *offline.images, "--set", "eval.image_quality=off", "--set",
                       "eval.download_weights=true")
    assert result.returncode == 0, result.stderr
    assert offline.attempts() == []
    m = json.loads((out / "metrics.json").read_text())
    for name in ("fid", "is", "lpips"):
        assert m[name] is None and m[f"{name}_reason"] == "eval.image_quality: off"
    assert "| fid | n/a (eval.image_quality: off) |" in (out / "report.md").read_text()


def test_off_builds_no_network(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(metrics, "ImageQuality", lambda *args, **kwargs: built.append(args))
    out = tmp_path / "run"
    assert run.main(["configs/digits/mqvae.yaml", *TINY, "--set", "eval.image_quality=off", "--out", str(out)]) == 0
    assert built == []


# -- the cache lookup ----------------------------------------------------------------------------------------


def test_weights_are_looked_for_where_torch_hub_keeps_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cached_weights(alexnet_url()) == tmp_path / "hub" / "checkpoints" / ALEXNET_FILE
    # torchvision's own default for the weights LPIPS builds.
    from torchvision.models import AlexNet_Weights

    assert alexnet_url() == AlexNet_Weights.DEFAULT.url
    if FIDELITY:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        assert cached_weights(metrics.inception_url()).name == URL_INCEPTION_V3.rsplit("/", 1)[1]
    else:
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            metrics.inception_url()


def _images(side=32):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 1, side, side, generator=g)
    return real, (real + 0.05).clamp(0, 1)


def test_cached_weights_are_used_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ALEXNET_FILE).write_bytes(b"")  # a stand-in: its presence is what counts
    built, random_backbone = [], metrics.LpipsNetwork

    def stand_in(net):
        built.append(net)
        return random_backbone(net=net, pnet_rand=True)  # AlexNet-shaped, without loading the stand-in file

    monkeypatch.setattr(metrics, "LpipsNetwork", stand_in)
    quality = ImageQuality("cpu")
    quality.update(*_images())
    out = quality.compute()
    assert built == ["alex"] and out["lpips_reason"] is None and out["lpips"] >= 0


def test_a_cached_file_that_does_not_load_is_a_null_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ALEXNET_FILE).write_bytes(b"")
    quality = ImageQuality("cpu")
    quality.update(*_images())
    reason = quality.compute()["lpips_reason"]
    assert reason.startswith("LPIPS AlexNet weights in the local cache") and "do not load: EOFError" in reason


def test_alexnet_is_not_looked_for_when_the_images_are_too_small(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    looked_for, lookup = [], metrics.cached_weights
    monkeypatch.setattr(metrics, "cached_weights", lambda url: looked_for.append(url) or lookup(url))
    quality = ImageQuality("cpu")
    quality.update(*_images(16))
    assert "cannot take 16x16 images" in quality.compute()["lpips_reason"]
    assert alexnet_url() not in looked_for


# -- library warnings into log.jsonl -------------------------------------------------------------------------


def test_library_warnings_go_to_the_log_once_and_not_to_the_terminal(tmp_path, monkeypatch, capfd):
    from betty.logging.logger_base import get_logger

    load_datasets, maintain = experiment.load_datasets, LevelEngine.maintain

    def loading(*args, **kwargs):  # before the engine exists
        warnings.warn("stand-in warning while the data loads", UserWarning)
        return load_datasets(*args, **kwargs)

    def maintaining(self):  # every iteration, and from two loggers
        warnings.warn("stand-in   warning\nof every iteration", FutureWarning)
        logging.getLogger("somelibrary").warning("stand-in log record")
        get_logger().warning("stand-in Betty record")
        maintain(self)

    monkeypatch.setattr(experiment, "load_datasets", loading)
    monkeypatch.setattr(LevelEngine, "maintain", maintaining)
    handlers = get_logger().handlers[:], logging.getLogger().handlers[:]
    out = tmp_path / "run"
    assert run.main(["configs/digits/mqvae.yaml", *TINY, "--out", str(out)]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines() == [captured.out.strip()] and captured.out.startswith(f"{out}: ")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r["warning"] for r in records if "warning" in r]
    assert len(logged) == len(set(logged)) == 4, logged
    assert any(w.startswith("UserWarning: stand-in warning while the data loads (") for w in logged)
    assert any(w.startswith("FutureWarning: stand-in warning of every iteration (test_quiet.py:") for w in logged)
    assert "somelibrary WARNING: stand-in log record" in logged and "betty WARNING: stand-in Betty record" in logged
    assert (get_logger().handlers, logging.getLogger().handlers) == handlers  # the loggers are as they were


def test_a_warning_line_is_one_line_with_a_short_place():
    import torch.optim.lr_scheduler as module

    line = warning_line("two\n  lines", UserWarning, module.__file__, 12)
    assert line == f"UserWarning: two lines ({os.path.join('torch', 'optim', 'lr_scheduler.py')}:12)"
