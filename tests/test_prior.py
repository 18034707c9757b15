"""The PixelCNN prior (MQ-VAE Fig. 3): causality of the gated PixelCNN, code maps and decoding against the source
network, training, sampling and exact resume, the sweep's seed placeholder, and bad input as one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import run
from engines.engine import LevelEngine
from engines.experiment import build_engine
from engines.run_folder import write_config
from mqvae.config import load_config
from mqvae.errors import UserError
from mqvae.evaluation.evaluate import first_images
from mqvae.nn.pixelcnn import GatedPixelCNN
from mqvae.evaluation.comparison import expand, load_sweep
from tests.helpers import results, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
        "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=4", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "device=cpu"]
PRIOR = ["--set", "prior.channels=16", "--set", "prior.layers=3", "--set", "train.log_every=5", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished tiny VQ-VAE run on digits (16 codes, 4x4 code maps)."""
    out = tmp_path_factory.mktemp("source") / "vqvae"
    assert run.main([str(ROOT / "configs/digits/vqvae.yaml"), *TINY, "--set", "train.iters=40", "--out", str(out)]) == 0
    return out


def prior_args(source: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs/digits/prior.yaml"), *PRIOR, "--set", f"prior.run={source}", *extra]


# -- causality ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [0, 10])
def test_no_logit_depends_on_its_own_or_a_later_code(num_classes):
    """d logits[p] / d input[q] == 0 for every q >= p in raster order, through the whole stack of layers (the first
    of mask type A, the others B), on a map larger than the receptive field's reach; and no blind spot: a deep
    enough network's logits at p depend on every earlier position."""
    torch.manual_seed(0)
    height, width = 5, 6
    net = GatedPixelCNN(num_codes=7, channels=8, layers=6, kernel=3, num_classes=num_classes).double()
    x = torch.randn(2, 8, height, width, dtype=torch.double, requires_grad=True)
    labels = torch.tensor([1, 3]) if num_classes else None
    logits = net.embedded_logits(x, labels)
    for p in range(height * width):
        i, j = divmod(p, width)
        (grad,) = torch.autograd.grad(logits[0, :, i, j].sum(), x, retain_graph=True)
        reach = grad[0].abs().sum(0).flatten()  # per position q: how much logits[p] depends on input q
        assert torch.all(reach[p:] == 0), f"position {p} depends on positions {(reach[p:] != 0).nonzero().flatten().tolist()} at or after it"
        assert torch.all(reach[:p] != 0), f"position {p} is blind to earlier positions {(reach[:p] == 0).nonzero().flatten().tolist()}"
        assert torch.all(grad[1] == 0)  # nor on another image of the batch


@pytest.mark.parametrize("num_classes", [0, 10])
def test_changing_a_code_changes_no_earlier_logit(num_classes):
    """The perturbation form on integer codes: change code q, and the logits of every position up to q stay
    exactly equal, while some later position's change."""
    torch.manual_seed(1)
    net = GatedPixelCNN(num_codes=7, channels=8, layers=4, kernel=3, num_classes=num_classes)
    codes = torch.randint(0, 7, (1, 4, 5))
    labels = torch.tensor([2]) if num_classes else None
    before = net(codes, labels).flatten(2)
    for q in (0, 7, 12, 18):
        changed = codes.clone().flatten()
        changed[q] = (changed[q] + 1) % 7
        after = net(changed.reshape(codes.shape), labels).flatten(2)
        assert torch.equal(after[..., : q + 1], before[..., : q + 1])
        assert not torch.equal(after[..., q + 1:], before[..., q + 1:])


def test_the_class_label_conditions_the_logits():
    torch.manual_seed(2)
    net = GatedPixelCNN(num_codes=7, channels=8, layers=2, kernel=3, num_classes=10)
    codes = torch.randint(0, 7, (1, 3, 3))
    assert not torch.allclose(net(codes, torch.tensor([0])), net(codes, torch.tensor([1])))


# -- code maps and decoding -----------------------------------------------------------------------------------
def test_code_maps_are_the_nearest_codes_and_decode_to_the_reconstructions(source, tmp_path):
    """The training data are the nearest code (by brute-force distance, not the quantizer's search) of each encoder
    output vector at its (row, column); decoding a test code map through the frozen codebook and decoder gives the
    source network's own reconstruction."""
    cfg = load_config(ROOT / "configs/digits/prior.yaml", PRIOR[1::2] + [f"prior.run={source}"])
    engine = build_engine(cfg, tmp_path)
    model = engine.model
    network = model.source
    x = first_images(engine.model.images, 8)
    with torch.no_grad():
        z_e = network.encoder(x)
        codebook = network.quantizer.effective_codebook()
        distances = ((z_e.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1)  # (B, H, W, K)
        expected = distances.argmin(-1)
        codes = engine.datasets.test.tensors[0][:8]
        assert codes.shape == (8, 4, 4)
        assert torch.equal(codes, expected)
        assert torch.allclose(model.decode(codes), network(x).output, atol=1e-6)
    assert engine.datasets.test.tensors[1][:8].tolist() == [int(engine.model.images[i][1]) for i in range(8)]
    assert not any(p.requires_grad for p in network.parameters())


# -- training, samples and resume -----------------------------------------------------------------------------
def test_a_prior_learns_the_codes_and_samples_images(source, tmp_path):
    out = tmp_path / "prior"
    assert run.main([*prior_args(source, "--set", "train.iters=80", "--set", "train.eval_every=40"),
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # A uniform prior over the 16 codes has log2(16) = 4 bits per code.
    assert metrics["test_nll_bits"] < math.log2(16)
    for name in ("fid", "is"):  # measured, or null with the reason
        assert metrics[name] is not None or metrics[f"{name}_reason"]
    assert "lpips" not in metrics
    for name in ("samples.png", "curves.png", "checkpoint.pt", "report.md", "log.jsonl"):
        assert (out / name).is_file()
    evaluations = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "test_nll_bits" in r]
    assert [r["step"] for r in evaluations] == [40, 80]
    assert evaluations[-1]["test_nll_bits"] == metrics["test_nll_bits"]

    cfg = load_config(out / "config.yaml")
    assert cfg.model.hidden_channels == 8 and cfg.quantizer.num_codes == 16  # the source's network, recorded
    engine = build_engine(cfg, tmp_path / "samples")
    images = engine.model.samples(5, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert images.shape == (5, 1, 16, 16)
    assert images.min() >= 0 and images.max() <= 1


def test_fid_and_is_of_samples_over_training_with_stand_in_networks(source, tmp_path, monkeypatch):
    """Where the image-quality networks exist (stand-ins here), every evaluation measures FID and IS of decoded
    samples, and the final metrics hold them; LPIPS, which compares pairs, is not reported."""
    from mqvae.evaluation import evaluate as evaluation
    from mqvae.evaluation.metrics import ImageQuality
    from tests.test_evaluation import Pooled

    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: ImageQuality(
        device, fid_feature=Pooled(8), is_feature=Pooled(10)))
    out = tmp_path / "prior"
    assert run.main([*prior_args(source, "--set", "train.iters=6", "--set", "train.eval_every=3"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("fid", "is"):
        assert math.isfinite(metrics[name]) and metrics[f"{name}_reason"] is None
    assert "lpips" not in metrics
    evaluations = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "test_nll_bits" in r]
    assert [r["step"] for r in evaluations] == [3, 6] and all(math.isfinite(r["fid"]) for r in evaluations)
    # The final evaluation draws the same samples from the same prior as the last one during training.
    assert evaluations[-1]["fid"] == pytest.approx(metrics["fid"])


def test_a_class_conditional_prior_trains(source, tmp_path):
    out = tmp_path / "conditional"
    assert run.main([*prior_args(source, "--set", "train.iters=10", "--set", "train.eval_every=1",
                                "--set", "prior.class_conditional=true"), "--out", str(out)]) == 0
    # It learns: the test NLL falls at every evaluation. (Below log2(16) bits, uniform over the 16 codes, is
    # not a bound after 10 steps: the source's codes are used almost uniformly since k-means follows a warm-up.)
    nll = [r["test_nll_bits"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
           if "test_nll_bits" in r]
    assert len(nll) == 10 and all(later < earlier for earlier, later in zip(nll, nll[1:])), nll
    assert json.loads((out / "metrics.json").read_text())["test_nll_bits"] == pytest.approx(nll[-1])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["levels"]["prior"]["layers.0.condition.weight"].shape[0] == 10


def test_an_interrupted_prior_resumes_exactly(source, tmp_path, monkeypatch):
    args = prior_args(source, "--set", "train.iters=12", "--set", "train.checkpoint_every=4", "--set",
                      "train.eval_every=6")
    assert run.main([*args, "--out", str(tmp_path / "full")]) == 0
    original = LevelEngine.train_step

    def interrupted(self):
        if self.global_step == 10:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(LevelEngine, "train_step", interrupted)
    assert run.main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(LevelEngine, "train_step", original)
    assert run.main(["--resume", str(tmp_path / "cut")]) == 0

    full, cut = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("full", "cut"))
    assert full["step"] == cut["step"] == 12
    for key, value in full["levels"]["prior"].items():
        assert torch.equal(value, cut["levels"]["prior"][key]), key
    metrics = [results(json.loads((tmp_path / name / "metrics.json").read_text())) for name in ("full", "cut")]
    assert metrics[0] == metrics[1]


def test_a_prior_refuses_to_resume_after_its_source_changed(source, tmp_path, monkeypatch, capsys):
    # A copy of the source, extended after the prior started: the prior's codes were learned on the old source.
    own = tmp_path / "source"
    shutil.copytree(source, own, ignore=shutil.ignore_patterns(".lock"))
    args = prior_args(own, "--set", "train.iters=8", "--set", "train.checkpoint_every=4", "--out", str(tmp_path / "p"))
    monkeypatch.setattr(LevelEngine, "train_step", interrupt_after(LevelEngine.train_step, 6))
    assert run.main(args) == 130
    monkeypatch.undo()
    assert run.main(["--resume", str(own), "--set", "train.iters=45"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir() if p.is_file() and p.name != ".lock"}
    line = one_line_error(capsys, ["--resume", str(tmp_path / "p")])
    assert "--resume:" in line and str(own) in line and "has changed since" in line, line
    assert {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir() if p.is_file() and p.name != ".lock"} == before


def interrupt_after(train_step, step: int):
    def interrupted(self):
        if self.global_step == step:
            raise KeyboardInterrupt
        train_step(self)

    return interrupted


# -- sweeps ---------------------------------------------------------------------------------------------------
def test_the_fig3_sweep_names_each_seeds_source_run(tmp_path):
    sweep = load_sweep(ROOT / "configs/tables/fig3_prior_digits.yaml")
    planned = expand(sweep, tmp_path)
    runs = {(run.label, run.seed): run.overrides for run in planned}
    assert len(runs) == 10
    assert "prior.run=runs/fig3_sources_digits/mq-vae/seed3" in runs[("MQ-VAE prior", 3)]
    assert "prior.run=runs/fig3_sources_digits/vq-vae/seed0" in runs[("VQ-VAE prior", 0)]
    sources = expand(load_sweep(ROOT / "configs/tables/fig3_sources_digits.yaml"), Path("runs/fig3_sources_digits"))
    assert {str(run.run_dir) for run in sources} >= {"runs/fig3_sources_digits/mq-vae/seed3",
                                                    "runs/fig3_sources_digits/vq-vae/seed0"}


# -- bad input ------------------------------------------------------------------------------------------------
def fake_run(folder: Path, **config) -> Path:
    """A folder that looks like a finished run of ``config`` (a config.yaml, a checkpoint and metrics.json)."""
    folder.mkdir(parents=True)
    write_config(folder, tiny_config(**config))
    torch.save({}, folder / "checkpoint.pt")
    (folder / "metrics.json").write_text("{}")
    return folder


def one_line_error(capsys, args) -> str:
    assert run.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_sources_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no finished run (no config.yaml, checkpoint.pt, metrics.json)" in one_line_error(
        capsys, prior_args(empty))
    assert "holds no finished run" in one_line_error(capsys, prior_args(tmp_path / "missing"))
    classifier = fake_run(tmp_path / "classifier", model={"kind": "resnet18"})
    assert "a run of the classification task" in one_line_error(capsys, prior_args(classifier))
    grouped = fake_run(tmp_path / "grouped", quantizer={"groups": 2})
    assert "quantizes in 2 groups" in one_line_error(capsys, prior_args(grouped))
    diverged = fake_run(tmp_path / "diverged")
    (diverged / "metrics.json").write_text(json.dumps({"diverged": "train: a loss became NaN"}))
    assert "diverged" in one_line_error(capsys, prior_args(diverged))
    broken = fake_run(tmp_path / "broken")
    assert "prior.run: " + str(broken / "checkpoint.pt") + " is not a valid checkpoint" in one_line_error(
        capsys, prior_args(broken, "--out", str(tmp_path / "p")))


def test_bad_prior_configs_are_one_line(source, tmp_path, capsys):
    assert "a prior's network is its source run's" in one_line_error(
        capsys, prior_args(source, "--set", "model.hidden_channels=32"))
    assert "a prior learns the codes of the source's data set" in one_line_error(
        capsys, prior_args(source, "--set", "data.name=mnist"))
    assert "prior.kernel: 4 is even" in one_line_error(capsys, prior_args(source, "--set", "prior.kernel=4"))
    assert "trains the network, but this config trains a prior" in one_line_error(
        capsys, prior_args(source, "--set", "levels.prior.problem=VQVAE", "--out", str(tmp_path / "a")))
    assert "name the run whose codes it learns with prior.run" in one_line_error(
        capsys, [str(ROOT / "configs/digits/prior.yaml"), *PRIOR, "--set", "prior.run=''", "--out", str(tmp_path / "b")])


def test_a_prior_run_is_not_a_source(source, tmp_path):
    out = tmp_path / "prior"
    assert run.main([*prior_args(source, "--set", "train.iters=2"), "--out", str(out)]) == 0
    with pytest.raises(UserError, match="is itself a prior run"):
        load_config(ROOT / "configs/digits/prior.yaml", [f"prior.run={out}"])
