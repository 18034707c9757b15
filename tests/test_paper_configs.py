"""configs/paper/*.yaml load, validate, and run 2 iterations on tiny stand-ins in each data set's real format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fake_datasets
from helpers import stand_in_lpips_vgg
import problems  # noqa: F401  (registers the level kinds the configs name)
import run
from mqvae.config import load_config
from mqvae.data import load_datasets
from mqvae.errors import UserError
from mqvae.method.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(p.name for p in (ROOT / "configs" / "paper").glob("*.yaml"))
WRITERS = {
    "mnist": lambda root: fake_datasets.write_mnist(root, 8, 8, kind="MNIST"),
    "fashion_mnist": lambda root: fake_datasets.write_mnist(root, 8, 8, kind="FashionMNIST"),
    "cifar10": lambda root: fake_datasets.write_cifar10(root, 2),
    "cifar100": lambda root: fake_datasets.write_cifar100(root, 8),
    "svhn": lambda root: fake_datasets.write_svhn(root, 8),
}
SMALL = ["--set", "train.iters=2", "--set", "train.log_every=1", "--set", "train.eval_every=0",
         "--set", "train.checkpoint_every=0", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
         "--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
         "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=8", "--set", "device=cpu"]


# Ablations at the paper's settings beyond the paper's own two runs per data set.
ABLATIONS = ["fashion_mnist_vqvae_codebook_lr.yaml"]
# Table 7's MQ-VAE‡ (App. E): the data set's MQ-VAE config with the hypergradient on both sides.
MUTUAL = ["cifar100_mqvae_ddagger.yaml"]
# The authors' released code's settings beside each paper MQ-VAE config (README, "MQ-VAE as its authors ran it").
AUTHORS = sorted(f"{d}_mqvae_authors.yaml" for d in WRITERS)


# MQ-GAN (App. G, Table 8) and its VQ-GAN baseline at 256 px, on image folders.
MQGAN = sorted(f"{d}_{m}.yaml" for d in ("celeba_hq", "imagenet") for m in ("mqgan", "vqgan"))


def test_every_data_set_has_both_paper_configs_and_the_authors_preset():
    assert PAPER == sorted([f"{d}_{m}.yaml" for d in WRITERS for m in ("mqvae", "vqvae")] + ABLATIONS + MUTUAL + AUTHORS
                           + MQGAN)


@pytest.mark.parametrize("name", AUTHORS)
def test_authors_preset_has_their_codes_settings(name):
    cfg = load_config(ROOT / "configs" / "paper" / name)
    paper = load_config(ROOT / "configs" / "paper" / name.replace("_authors", ""))
    assert (cfg.model, cfg.quantizer, cfg.data.name) == (paper.model, paper.quantizer, paper.data.name)
    assert (cfg.hypergradient.type, cfg.hypergradient.alpha, cfg.hypergradient.roll_back) == ("darts", 0.01, False)
    # App. I's 512 images per optimizer step, in 4 accumulated micro-batches, over as many optimizer steps.
    assert cfg.data.batch_size * 4 == paper.data.batch_size and cfg.train.iters == 4 * paper.train.iters
    codebook, autoencoder = cfg.levels
    assert (codebook.optimizer, codebook.momentum, codebook.lr, codebook.weight_decay) == ("sgd", 0.9, 1e-4, 0.0)
    assert (autoencoder.optimizer, autoencoder.betas, autoencoder.eps, autoencoder.lr, autoencoder.weight_decay) == \
        ("adamw", [0.5, 0.9], 1e-7, 1e-4, 0.0)
    for level in cfg.levels:
        assert (level.grad_accumulation, level.scheduler, level.warmup_ratio, level.min_lr) == (4, "warmup_cosine", 0.1, 0.0)


@pytest.mark.parametrize("name", sorted(set(PAPER) - set(AUTHORS) - set(MQGAN)))
def test_paper_config_validates_with_the_papers_settings(name):
    cfg = load_config(ROOT / "configs" / "paper" / name)
    assert (cfg.quantizer.num_codes, cfg.quantizer.dim, cfg.quantizer.beta, cfg.data.batch_size) == (1024, 512, 0.1, 512)
    for level in cfg.levels:
        assert (level.optimizer, level.scheduler, level.warmup_ratio, level.weight_decay) == ("adamw", "warmup_cosine", 0.1, 1e-4)
        assert level.lr == (6e-2 if level.problem == "Codebook" else 3e-4)
        if name in ABLATIONS:  # the codebook at the MQ-VAE codebook level's lr, in VQ-VAE's one level
            assert level.params.codebook_lr == 6e-2
    assert cfg.hypergradient.mutual == (name in MUTUAL)
    assert name.startswith(f"{cfg.data.name}_")


# (The authors' presets read the same files as the paper's MQ-VAE configs; two iterations of theirs would step
# nothing, with accumulation 4. configs/digits/mqvae_authors.yaml trains in tests/test_authors.py.)
@pytest.mark.parametrize("name", sorted(set(PAPER) - set(AUTHORS) - set(MQGAN)))
def test_paper_config_runs_two_iterations_on_stand_in_files(tmp_path, monkeypatch, name):
    from mqvae.evaluation import evaluate as evaluation

    fake_datasets.skip_md5_checks(monkeypatch)
    # FID/IS/LPIPS construction is covered by test_evaluation; here it would only cost time per config.
    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: None)
    dataset = load_config(ROOT / "configs" / "paper" / name).data.name
    WRITERS[dataset](tmp_path / "data")
    out = tmp_path / "run"
    # The data path is tested with Adam; test_adamw_levels_run covers AdamW.
    adam = [x for i in range(len(load_config(ROOT / "configs" / "paper" / name).levels))
            for x in ("--set", f"levels.{i}.optimizer=adam")]
    assert run.main([f"configs/paper/{name}", *SMALL, *adam, "--set", f"data.root={tmp_path / 'data'}", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["test_mse"] > 0


@pytest.mark.parametrize("name", MQGAN)
def test_mqgan_config_has_the_authors_settings(name):
    cfg = load_config(ROOT / "configs" / "paper" / name)
    model, quantizer = cfg.model, cfg.quantizer
    assert (model.kind, model.hidden_channels, model.ch_mult, model.num_res_blocks, model.attn_resolutions,
            model.z_channels, model.quant_conv, model.z_norm) == ("vqgan", 128, [1, 1, 2, 2, 4], 2, [16], 256, True, "layer")
    assert (quantizer.num_codes, quantizer.dim, quantizer.codebook_mlp, quantizer.beta, quantizer.codebook_weight) == \
        (16384, 32, [256], 0.1, 0.1)
    assert (cfg.loss.reconstruction, cfg.loss.perceptual_weight) == ("l1", 1.0)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.random_crop, cfg.data.range, cfg.data.batch_size) == \
        ("image_folder", 256, True, [-1.0, 1.0], 16)
    levels = {level.problem: level for level in cfg.levels}
    disc = levels["Discriminator"]
    # disc_start: 10 % of the iterations (20 % on ImageNet), the authors' default; rate_d 0.1.
    share = 0.2 if name.startswith("imagenet") else 0.1
    assert (disc.params.disc_start, disc.params.disc_weight) == (int(share * cfg.train.iters), 0.1)
    trained = [levels["AutoEncoder"], disc] if "mqgan" in name else [levels["VQVAE"], disc]
    for level in trained:
        assert (level.optimizer, level.lr, level.betas, level.eps, level.weight_decay) == ("adamw", 1e-4, [0.5, 0.9], 1e-7, 0.0)
    if "mqgan" in name:
        codebook = levels["Codebook"]
        assert (codebook.optimizer, codebook.momentum, codebook.lr, codebook.lower) == ("sgd", 0.9, 1e-4, ["generator"])
        assert cfg.hypergradient.type == "mqvae"
    # MQ-GAN and its VQ-GAN baseline differ in the levels alone.
    baseline = load_config(ROOT / "configs" / "paper" / name.replace("mqgan", "vqgan"))
    assert (cfg.data, cfg.model, cfg.quantizer, cfg.loss, cfg.train) == \
        (baseline.data, baseline.model, baseline.quantizer, baseline.loss, baseline.train)


# The 256-px configs on a stand-in image folder of a few images, with a narrow network, the discriminator on from
# the start and one-step accumulation (so that 2 iterations step every level), and a stand-in for LPIPS's VGG.
SMALL_GAN = ["--set", "train.iters=2", "--set", "train.log_every=1", "--set", "train.eval_every=0",
             "--set", "train.checkpoint_every=0", "--set", "data.batch_size=2", "--set", "data.num_workers=0",
             "--set", "model.hidden_channels=8", "--set", "model.num_res_blocks=1", "--set", "model.norm_groups=8",
             "--set", "model.z_channels=8", "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=8",
             "--set", "quantizer.codebook_mlp=[8]", "--set", "levels.discriminator.params.disc_start=0",
             "--set", "levels.discriminator.params.filters=4", "--set", "device=cpu"]


@pytest.mark.parametrize("name", MQGAN)
def test_mqgan_config_runs_two_iterations_at_256_px_on_a_few_images(tmp_path, monkeypatch, name):
    from mqvae.evaluation import evaluate as evaluation

    stand_in_lpips_vgg(monkeypatch)
    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: None)
    fake_datasets.write_image_folder(tmp_path / "data", 2)
    one_step = [x for level in load_config(ROOT / "configs" / "paper" / name).levels
                for x in ("--set", f"levels.{level.name}.grad_accumulation=1")]
    out = tmp_path / "run"
    assert run.main([f"configs/paper/{name}", *SMALL_GAN, *one_step, "--set", f"data.root={tmp_path / 'data'}",
                     "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"generator.gan", "generator.perceptual", "discriminator.loss"} <= set(records[-1])
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 2


CPU_SCALE = sorted(p.name for p in (ROOT / "configs" / "fashion_mnist").glob("*.yaml"))


@pytest.mark.parametrize("name", CPU_SCALE)
def test_cpu_scale_config_keeps_the_papers_method_settings_and_runs_on_debian_files(tmp_path, monkeypatch, name):
    # configs/fashion_mnist/ shrinks the network, codes, batch and run, and keeps the paper's optimizer, lrs,
    # schedule, beta and k-means init (App. I). It reads the Debian package's layout (gzipped files in data.root).
    from mqvae.evaluation import evaluate as evaluation

    cfg = load_config(ROOT / "configs" / "fashion_mnist" / name)
    assert cfg.data.name == "fashion_mnist" and cfg.data.root == "/usr/share/datasets/fashion-mnist"
    assert (cfg.quantizer.num_codes, cfg.quantizer.beta, cfg.quantizer.kmeans_init) == (1024, 0.1, True)
    for level in cfg.levels:
        assert (level.optimizer, level.scheduler, level.warmup_ratio, level.weight_decay) == ("adamw", "warmup_cosine", 0.1, 1e-4)
        assert level.lr == (6e-2 if level.problem == "Codebook" else 3e-4)
    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: None)
    fake_datasets.write_mnist(tmp_path / "data", 8, 8, kind="FashionMNIST", layout="debian", gzipped=True)
    out = tmp_path / "run"
    assert run.main([f"configs/fashion_mnist/{name}", *SMALL, "--set", f"data.root={tmp_path / 'data'}", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 2


@pytest.mark.parametrize("name", ["mnist_mqvae.yaml", "mnist_vqvae.yaml", "fashion_mnist_mqvae.yaml",
                                  "fashion_mnist_vqvae.yaml"])
def test_paper_model_reconstructs_native_28_px_images(tmp_path, name):
    # The paper's full-width model: two stride-2 convolutions take 28 -> 14 -> 7, the transposed ones 7 -> 28.
    cfg = load_config(ROOT / "configs" / "paper" / name)
    dataset = name.rsplit("_", 1)[0]
    WRITERS[dataset](tmp_path)
    sets = load_datasets(dataset, str(tmp_path), download=False, seed=0)
    x = torch.stack([sets.test[i][0] for i in range(2)])
    assert sets.image_size == 28 and x.shape == (2, 1, 28, 28)
    model = build_model(cfg, sets.channels, sets.num_classes, sets.image_size).eval()
    with torch.no_grad():
        out = model(x)
        assert out.z_e.shape[-2:] == (7, 7) and out.output.shape == x.shape
        assert model.task_loss(out.output, (x, None)) > 0


def test_a_decoder_that_cannot_return_the_input_size_is_a_one_line_error():
    cfg = load_config(ROOT / "configs" / "paper" / "mnist_vqvae.yaml",
                      ["model.downsample=3", "model.hidden_channels=8", "model.res_channels=4"])
    model = build_model(cfg, 1, 10, 28)
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(UserError, match=r"\(24, 24\) images for \(28, 28\) inputs"):
        model.task_loss(model(x).output, (x, None))


def test_adamw_levels_run(tmp_path, monkeypatch):
    from mqvae.evaluation import evaluate as evaluation

    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: None)
    assert run.main(["configs/digits/mqvae.yaml", *SMALL, "--set", "levels.0.optimizer=adamw",
                     "--set", "levels.1.optimizer=adamw", "--out", str(tmp_path / "run")]) == 0
