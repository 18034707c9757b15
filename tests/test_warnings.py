"""The run's warnings (``LevelEngine.warn``): each fires on a case built to trigger it, once, on stderr and in
log.jsonl; none fires on any shipped config.

- a level whose parameters get a zero gradient for ZERO_GRADIENT_STEPS optimizer steps in a row;
- a hypergradient type whose implicit term is exactly zero (Betty's neumann and cg under the plain STE);
- hypergradient settings in a config where no level has a level below it.

The standalone quantizer's own warning, for a training loop that never calls its ``maintain``, is never the
engine's: the engine maintains after every iteration, on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import fake_datasets
from engines import experiment
from engines.engine import ZERO_GRADIENT_STEPS, LevelEngine
from mqvae.config import load_config
from mqvae.method.hypergradients import WATCHED_STEPS
from mqvae.nn.quantizers.vq import UNMAINTAINED_FORWARDS

from helpers import is_base_config, stand_in_lpips_vgg, tiny_engine
from test_paper_configs import MQGAN, SMALL, SMALL_GAN, WRITERS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
        "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=4", "--set", "data.batch_size=16",
        "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "device=cpu"]

# A level on the codebook whose loss is the task loss alone: under the plain straight-through estimator the task
# loss has no path to the codes (sg[.]), so this level's gradient is exactly zero at every step.
TASK_ONLY_CODEBOOK = '''
from problems import Codebook, register_problem


@register_problem
class TaskOnlyCodebook(Codebook):
    def loss_terms(self, batch):
        terms = self.model.loss(batch, weights=self.loss_weights())
        return {**terms, "loss": terms["task"]}
'''


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def warnings_of(result, run_dir: Path) -> tuple[list[str], list[str]]:
    """The warning lines on stderr, and the warning records of log.jsonl."""
    assert result.returncode == 0, result.stderr
    terminal = [line[len("warning: "):] for line in result.stderr.splitlines() if line.startswith("warning: ")]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return terminal, [r["warning"] for r in records if "warning" in r]


def test_a_level_whose_gradient_is_exactly_zero_is_reported_once(tmp_path):
    plugin = tmp_path / "task_only.py"
    plugin.write_text(TASK_ONLY_CODEBOOK)
    iters = ZERO_GRADIENT_STEPS + 10
    common = ["configs/digits/mqvae.yaml", *TINY, "--set", f"train.iters={iters}", "--set", "train.log_every=5",
              "--set", "hypergradient.type=direct", "--import", plugin]
    result = run_cli(*common, "--set", "levels.codebook.problem=TaskOnlyCodebook", "--out", tmp_path / "bad")
    terminal, logged = warnings_of(result, tmp_path / "bad")
    zero = [m for m in logged if "got a zero gradient" in m]
    assert len(zero) == 1 and terminal == logged, (terminal, logged)
    assert "level 'codebook' (TaskOnlyCodebook)" in zero[0]
    # The same run with the shipped Codebook level (Eq. 6 with its codebook term) learns: no warning.
    result = run_cli(*common, "--out", tmp_path / "good")
    assert warnings_of(result, tmp_path / "good") == ([], [])


def test_the_zero_gradient_warning_needs_the_steps_in_a_row(tmp_path):
    plugin = tmp_path / "task_only.py"
    plugin.write_text(TASK_ONLY_CODEBOOK)
    # Fewer steps than the limit: the level is not (yet) reported.
    result = run_cli("configs/digits/mqvae.yaml", *TINY, "--set", f"train.iters={ZERO_GRADIENT_STEPS - 5}",
                     "--set", "train.log_every=1", "--set", "hypergradient.type=direct", "--import", plugin,
                     "--set", "levels.codebook.problem=TaskOnlyCodebook", "--out", tmp_path / "short")
    assert warnings_of(result, tmp_path / "short") == ([], [])


@pytest.mark.parametrize("method, fires", [("neumann", True), ("cg", True), ("mqvae", False), ("darts", False),
                                           ("sama", False), ("direct", False)])
def test_a_hypergradient_that_reduces_to_direct_is_reported(tmp_path, method, fires):
    result = run_cli("configs/digits/mqvae.yaml", *TINY, "--set", f"train.iters={WATCHED_STEPS + 3}",
                     "--set", f"hypergradient.type={method}", "--out", tmp_path / "run")
    terminal, logged = warnings_of(result, tmp_path / "run")
    assert terminal == logged
    if fires:
        assert len(logged) == 1 and logged[0].startswith(f"hypergradient.type {method}: the implicit term of level "
                                                         "'codebook' through level 'autoencoder' was exactly zero")
    else:
        assert logged == []


def test_hypergradient_settings_in_a_one_level_config_are_reported(tmp_path):
    result = run_cli("configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=2", "--set", "hypergradient.type=neumann",
                     "--set", "hypergradient.alpha=0.5", "--out", tmp_path / "run")
    terminal, logged = warnings_of(result, tmp_path / "run")
    assert len(logged) == 1 and terminal == logged
    assert logged[0].startswith("hypergradient.type, hypergradient.alpha: no level of this config has a level below it")
    # The defaults written out are no setting: no warning.
    result = run_cli("configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=2", "--set", "hypergradient.type=mqvae",
                     "--out", tmp_path / "defaults")
    assert warnings_of(result, tmp_path / "defaults") == ([], [])


# A run whose engine skips the quantizer's maintenance, the case the quantizer's warning is for.
SKIPPED_MAINTENANCE = '''
from engines.engine import LevelEngine

LevelEngine.maintain = lambda self: None
'''


def test_the_engine_maintains_its_quantizer_so_it_never_warns_of_unmaintained_forwards(tmp_path):
    plugin = tmp_path / "skip_maintenance.py"
    plugin.write_text(SKIPPED_MAINTENANCE)
    # Both kinds of maintenance on, and UNMAINTAINED_FORWARDS forwards and more: an MQ-VAE iteration runs the
    # quantizer 4 times (each level's forward, Eq. 13's two perturbed passes), as the run without maintenance shows.
    common = ["configs/digits/mqvae.yaml", *TINY, "--set", f"train.iters={UNMAINTAINED_FORWARDS // 4 + 5}",
              "--set", "train.log_every=50", "--set", "quantizer.replace_freq=2", "--set", "quantizer.affine=ema"]
    result = run_cli(*common, "--out", tmp_path / "run")
    assert warnings_of(result, tmp_path / "run") == ([], [])
    # Without the engine's maintenance the quantizer says so, once, in log.jsonl (as a library's warning).
    result = run_cli(*common, "--import", plugin, "--out", tmp_path / "skipped")
    terminal, logged = warnings_of(result, tmp_path / "skipped")
    assert terminal == [] and len(logged) == 1 and "without a maintain() call" in logged[0], logged


def test_a_rank_that_takes_rank_0s_maintenance_is_not_warned(tmp_path):
    """Data-parallel: rank 0 maintains on the global batch and broadcasts the quantizer; the other ranks never call
    ``maintain``, and their forwards count as maintained. (In one process the collectives are the identity.)"""
    engine = tiny_engine(tmp_path, quantizer={"replace_freq": 2})
    engine.ranks, engine.writes = 2, False  # a rank other than 0
    engine.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, UNMAINTAINED_FORWARDS + 5):
            engine.global_step = step
            engine.train_step()
            engine.maintain()
    assert [str(w.message) for w in caught if "maintain()" in str(w.message)] == []


# -- no warning on any shipped config --------------------------------------------------------------------------

# The authors' paper presets are the paper MQ-VAE configs' data and network with configs/digits/mqvae_authors.yaml's
# levels and hypergradient, which are covered here: run at the paper's data they would add time and no case.
SHIPPED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")
                 if "tables" not in p.parts and not is_base_config(p) and not (p.parent.name == "paper" and p.stem.endswith("_authors")))


def test_every_shipped_config_is_covered():
    assert len([p for p in SHIPPED if p.startswith("configs/digits/")]) >= 15
    assert len([p for p in SHIPPED if p.startswith("configs/paper/")]) == 12 + len(MQGAN)
    assert "configs/digits/mqvae_authors.yaml" in SHIPPED
    assert len([p for p in SHIPPED if p.startswith("configs/fashion_mnist/")]) == 5


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A finished tiny reconstruction run, the source a shipped prior config is run on."""
    out = tmp_path_factory.mktemp("source") / "run"
    result = run_cli("configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=3", "--set", "eval.image_quality=off",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("path", SHIPPED)
def test_no_warning_fires_on_a_shipped_config(tmp_path, monkeypatch, path, request):
    """ZERO_GRADIENT_STEPS + 5 iterations of the config as shipped (the paper configs on small stand-ins, with
    their level graph, quantizer and hypergradient as shipped), its k-means init included."""
    overrides = ["train.iters=" + str(ZERO_GRADIENT_STEPS + 5), "train.log_every=5", "train.eval_every=0",
                 "train.checkpoint_every=0", "device=cpu"]
    if Path(path).name in MQGAN:  # 256-px image folders: a few stand-in images at 32 px, and a stand-in VGG
        fake_datasets.write_image_folder(tmp_path / "data", 4)
        stand_in_lpips_vgg(monkeypatch)
        overrides += [a for a in SMALL_GAN[1::2] if not a.startswith("train.")] + [
            f"data.root={tmp_path / 'data'}", "data.image_size=32"]
    elif not path.startswith("configs/digits/"):  # the paper's data sets, on small stand-ins
        fake_datasets.skip_md5_checks(monkeypatch)
        WRITERS[load_config(ROOT / path).data.name](tmp_path / "data")
        overrides += [a for a in SMALL[1::2] if not a.startswith("train.")] + [f"data.root={tmp_path / 'data'}"]
    if "prior" in yaml.safe_load((ROOT / path).read_text()):
        overrides.append(f"prior.run={request.getfixturevalue('source_run')}")  # (its source's sizes come along)
    cfg = load_config(ROOT / path, overrides)
    shown = []
    # The toolkit's warnings (library warnings, terminal=False, are the quiet-terminal tests' subject).
    monkeypatch.setattr(LevelEngine, "warn", lambda self, message, terminal=True: terminal and shown.append(message))
    (tmp_path / "run").mkdir()
    engine = experiment.build_engine(cfg, tmp_path / "run")
    if cfg.quantizer.kmeans_init and not cfg.prior.run:  # as run_experiment does: a prior's codes are its source's
        experiment.initialize_codebook(engine)
    engine.run()
    assert engine.global_step == cfg.train.iters
    assert shown == [], yaml.safe_dump(shown)
