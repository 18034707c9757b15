"""data.image_size, data.random_crop and data.range (MQ-GAN, MQ-VAE App. G): image folders at any size against a
reference written with PIL alone, random crops that are a pure function of (seed, epoch, index) whatever the batch,
the workers, the shard or a resume, [-1, 1] batches that are exactly 2x - 1 of the [0, 1] ones, metrics and pictures
in [0, 1], the default unchanged bit for bit, and refusals in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import run
from engines.experiment import build_engine
from engines.run_folder import write_config
from fake_datasets import skip_md5_checks, write_celeba, write_cifar10
from helpers import draw, tiny_config
from mqvae.config import load_config
from mqvae.data import InRange, SquareImages, load_datasets
from mqvae.data.loader import BatchStream
from mqvae.errors import UserError
from mqvae.evaluation import evaluate as evaluation
from mqvae.method.models import build_model
from mqvae.method.tasks import RECONSTRUCTION

ROOT = Path(__file__).resolve().parents[1]
# (width, height) of each image: one class folder per image, so that an item's label is its index. One is square:
# at any size it has one window only.
SIDES = [(40, 60), (64, 44), (50, 50), (45, 70), (60, 41), (52, 48)]


def write_folder(root: Path, seed: int = 0) -> dict:
    """root/{train,test}/cNN/000.png of random pixels (PNG: lossless), as {(split, index): PIL image}."""
    rng = np.random.default_rng(seed)
    images = {}
    for split in ("train", "test"):
        for i, (width, height) in enumerate(SIDES):
            folder = root / split / f"c{i:02d}"
            folder.mkdir(parents=True)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "000.png")
            images[split, i] = Image.fromarray(pixels)
    return images


# -- the reference: PIL and numpy only ---------------------------------------------------------------------------

def resized(image: Image.Image, size: int) -> Image.Image:
    """The shorter side to ``size``, the longer in proportion (rounded down), bilinear (PIL antialiases it)."""
    width, height = image.size
    new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    return image.resize(new, Image.BILINEAR)


def window(image: Image.Image, top: int, left: int, size: int) -> torch.Tensor:
    crop = np.asarray(image.crop((left, top, left + size, top + size)))
    return torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255


def center(image: Image.Image, size: int) -> torch.Tensor:
    small = resized(image, size)
    width, height = small.size
    return window(small, round((height - size) / 2), round((width - size) / 2), size)


def windows(image: Image.Image, size: int) -> dict:
    """Every size×size window of the resized image, by its (top, left)."""
    small = resized(image, size)
    width, height = small.size
    return {(top, left): window(small, top, left, size) for top in range(height - size + 1)
            for left in range(width - size + 1)}


def same(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a, b) for one, two in zip(first, second) for a, b in zip(one, two))


# -- sizes and crops -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48])
def test_image_folder_center_crops_test_images_and_randomly_crops_training_images_at_image_size(tmp_path, size):
    images = write_folder(tmp_path)
    sets = load_datasets("image_folder", str(tmp_path), False, 0, image_size=size, random_crop=True)
    assert sets.image_size == size
    for i in range(len(SIDES)):
        image, label = sets.test[i]
        assert label == i and image.shape == (3, size, size)
        assert torch.equal(image, center(images["test", i], size))
        # An integer index (k-means' first images, a prior's code maps) is the center crop, training split too.
        assert torch.equal(sets.train[i][0], center(images["train", i], size))
    options = {i: windows(images["train", i], size) for i in range(len(SIDES))}
    seen = {i: set() for i in options}
    for x, y in draw(BatchStream(sets.train, batch_size=3, seed=0), 8):  # 4 epochs
        for image, i in zip(x, y.tolist()):
            places = [place for place, crop in options[i].items() if torch.equal(image, crop)]
            assert len(places) == 1, (i, places)  # exactly one window of the resized image
            seen[i].update(places)
    for i, (width, height) in enumerate(SIDES):
        places = len(seen[i])
        assert places == 1 if width == height else places >= 2, (i, seen[i])  # the crop moves where it has room


def test_celeba_crops_a_140_px_window_then_resizes_it(tmp_path, monkeypatch):
    # The authors' CelebA transform: a random 140-px square of the 178×218 aligned face, then the resize.
    skip_md5_checks(monkeypatch)
    write_celeba(tmp_path, n=6)
    rng = np.random.default_rng(0)
    faces = {}
    for path in sorted((tmp_path / "celeba" / "img_align_celeba").glob("*.jpg")):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(path)
        with Image.open(path) as image:
            faces[path.name] = image.convert("RGB")  # what PIL decodes, JPEG's losses included
    sets = load_datasets("celeba", str(tmp_path), False, 0, image_size=32, random_crop=True)
    assert sets.image_size == 32
    test_faces = [faces[name] for name in ("000003.jpg", "000006.jpg")]  # the split of write_celeba: i % 3 == 2
    for i, face in enumerate(test_faces):
        assert torch.equal(sets.test[i][0], window(face.crop((19, 39, 159, 179)).resize((32, 32), Image.BILINEAR),
                                                    0, 0, 32))
    train_faces = [faces[name] for name in ("000001.jpg", "000004.jpg")]
    (x, _), = draw(BatchStream(sets.train, batch_size=2, seed=0, shuffle=False), 1)
    for image, face in zip(x, train_faces):
        places = [(top, left) for top in range(218 - 140 + 1) for left in range(178 - 140 + 1)
                  if torch.equal(image, window(face.crop((left, top, left + 140, top + 140)).resize(
                      (32, 32), Image.BILINEAR), 0, 0, 32))]
        assert len(places) == 1 and places != [(39, 19)], places


def crops_dataset(tmp_path):
    write_folder(tmp_path)
    return load_datasets("image_folder", str(tmp_path), False, 0, image_size=32, random_crop=True).train


def by_index(batches: list, per_epoch: int) -> dict:
    """{(epoch, index): image} of the batches of a stream of per_epoch batches an epoch."""
    return {(n // per_epoch, int(i)): image for n, (x, y) in enumerate(batches) for image, i in zip(x, y)}


def test_random_crops_are_a_function_of_the_seed_the_epoch_and_the_index_alone(tmp_path):
    dataset = crops_dataset(tmp_path)
    first = draw(BatchStream(dataset, batch_size=2, seed=5), 6)  # 2 epochs of 3 batches
    torch.manual_seed(123)  # neither the global generator ...
    assert same(draw(BatchStream(dataset, batch_size=2, seed=5), 6), first)
    # ... nor the batches' size, hence order, changes an item's crop in an epoch
    crops = by_index(first, 3)
    assert set(crops) == {(epoch, i) for epoch in range(2) for i in range(len(SIDES))}
    whole = by_index(draw(BatchStream(dataset, batch_size=6, seed=5), 2), 1)
    assert all(torch.equal(crops[key], whole[key]) for key in crops)
    assert any(not torch.equal(crops[0, i], crops[1, i]) for i in range(len(SIDES)))  # a new crop each epoch
    other = by_index(draw(BatchStream(dataset, batch_size=6, seed=6), 1), 1)
    assert any(not torch.equal(crops[0, i], other[0, i]) for i in range(len(SIDES)))  # another seed, other crops


def test_random_crops_are_the_same_with_0_and_2_workers(tmp_path):
    dataset = crops_dataset(tmp_path)
    assert same(draw(BatchStream(dataset, batch_size=2, seed=1, num_workers=2), 4),
                draw(BatchStream(dataset, batch_size=2, seed=1, num_workers=0), 4))


def test_two_shards_together_are_one_processs_global_batch(tmp_path):
    dataset = crops_dataset(tmp_path)
    whole = draw(BatchStream(dataset, batch_size=2, seed=2), 4)
    ranks = [draw(BatchStream(dataset, batch_size=2, seed=2, shard=(rank, 2)), 4) for rank in (0, 1)]
    joined = [tuple(torch.cat(parts) for parts in zip(*batches)) for batches in zip(*ranks)]
    assert same(joined, whole)


@pytest.mark.parametrize("consumed", [1, 3, 4])  # mid-epoch, at the boundary, past it (3 batches an epoch)
def test_a_resumed_stream_continues_the_crops_exactly(tmp_path, consumed):
    dataset = crops_dataset(tmp_path)
    uninterrupted = draw(BatchStream(dataset, batch_size=2, seed=3), consumed + 3)
    first = BatchStream(dataset, batch_size=2, seed=3)
    draw(first, consumed)
    resumed = BatchStream(dataset, batch_size=2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert same(draw(resumed, 3), uninterrupted[consumed:])


def test_a_holdout_split_keeps_its_random_crops(tmp_path):
    from mqvae.data import holdout_split

    rest, held = holdout_split(crops_dataset(tmp_path), 0.5, seed=0)
    assert isinstance(held, SquareImages) and held.random_crop and len(held) == 3
    assert all(len(batch[0]) == 3 for batch in draw(BatchStream(held, batch_size=3, seed=0), 2))


# -- the range ---------------------------------------------------------------------------------------------------

def _image_folder(tmp_path, monkeypatch, **shape):
    write_folder(tmp_path / "folder")
    return load_datasets("image_folder", str(tmp_path / "folder"), False, 0, image_size=32, random_crop=True, **shape)


def _cifar10(tmp_path, monkeypatch, **shape):
    skip_md5_checks(monkeypatch)
    write_cifar10(tmp_path / "cifar", n_per_batch=2)
    return load_datasets("cifar10", str(tmp_path / "cifar"), False, 0, **shape)


def _digits(tmp_path, monkeypatch, **shape):
    return load_datasets("digits", "", False, 0, **shape)


@pytest.mark.parametrize("load", [_digits, _cifar10, _image_folder], ids=["tensors", "torchvision", "square_images"])
def test_range_minus_one_one_gives_exactly_2x_minus_1_of_the_pixel_batches(tmp_path, monkeypatch, load):
    pixels, ranged = load(tmp_path / "pixels", monkeypatch), load(tmp_path / "ranged", monkeypatch, range_=[-1.0, 1.0])
    kind = {_digits: TensorDataset, _cifar10: InRange, _image_folder: SquareImages}[load]
    assert isinstance(ranged.train, kind) and isinstance(ranged.test, kind)
    for split in ("train", "test"):
        ones, twos = (draw(BatchStream(getattr(sets, split), batch_size=2, seed=0), 4) for sets in (pixels, ranged))
        for (x, y), (x2, y2) in zip(ones, twos):
            assert torch.equal(y2, y)
            assert torch.equal(x2, 2 * x - 1)
            assert x2.min() >= -1 and x2.max() <= 1 and x2.min() < -0.5  # the range, used
    assert evaluation.labels_of(ranged.test).tolist() == evaluation.labels_of(pixels.test).tolist()


def test_the_default_config_gives_the_pixels_of_a_reference_bit_for_bit(tmp_path, monkeypatch):
    # The expected [0, 1] tensors come from PIL (image folder) and from the bytes written (CIFAR-10).
    images = write_folder(tmp_path / "folder")
    cfg = tiny_config(data={"name": "image_folder", "root": str(tmp_path / "folder")})
    assert (cfg.data.image_size, cfg.data.random_crop, cfg.data.range) == (None, False, [0.0, 1.0])
    sets = load_datasets(cfg.data.name, cfg.data.root, False, 0, cfg.data.image_size, cfg.data.random_crop,
                         cfg.data.range)
    assert sets.image_size == 64
    for split, dataset in (("train", sets.train), ("test", sets.test)):
        for x, y in draw(BatchStream(dataset, batch_size=3, seed=0), 2):
            assert torch.equal(x, torch.stack([center(images[split, i], 64) for i in y.tolist()]))
    skip_md5_checks(monkeypatch)
    written = write_cifar10(tmp_path / "cifar", n_per_batch=2)
    cifar = load_datasets("cifar10", str(tmp_path / "cifar"), False, 0, cfg.data.image_size, cfg.data.random_crop,
                          cfg.data.range)
    expected = torch.from_numpy(written["test"][0]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(torch.stack([cifar.test[i][0] for i in range(len(cifar.test))]), expected)


def _model_and_data(range_):
    torch.manual_seed(0)
    cfg = tiny_config(levels=[{"name": "vqvae", "problem": "VQVAE"}], data={"name": "digits", "range": range_})
    model = build_model(cfg, 1, 10, 16).eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(13, 1, 16, 16, generator=g)
    labels = torch.randint(0, 10, (13,), generator=g)
    return model, pixels, TensorDataset(pixels * 2 - 1 if range_ == [-1, 1] else pixels, labels)


class Recorder:
    """An ImageQuality stand-in that keeps what it is given."""

    def __init__(self):
        self.real, self.fake = [], []

    def update(self, real, fake):
        self.real.append(real)
        self.fake.append(fake)

    def compute(self):
        return {}


def test_test_mse_and_image_quality_see_0_1_pixels_whatever_the_range():
    model, pixels, dataset = _model_and_data([-1, 1])
    assert model.range == (-1.0, 1.0)
    recorder = Recorder()
    metrics, _ = evaluation.evaluate(model, dataset, 5, "cpu", image_quality=recorder)
    with torch.no_grad():
        output = model(dataset.tensors[0]).output.double()  # in [-1, 1]'s units
    by_hand = float((((output + 1) / 2 - pixels.double()) ** 2).mean())
    in_range_units = float(((output - dataset.tensors[0].double()) ** 2).mean())
    assert metrics["test_mse"] == pytest.approx(by_hand, rel=1e-6)
    assert in_range_units == pytest.approx(4 * by_hand, rel=1e-6)  # what the training loss would say
    real, fake = torch.cat(recorder.real), torch.cat(recorder.fake)
    assert real.min() >= 0 and real.max() <= 1
    assert torch.allclose(real, pixels, atol=1e-7, rtol=0)
    assert torch.allclose(fake.double(), (output + 1) / 2, atol=1e-6, rtol=0)


def test_recon_png_receives_0_1_pixels(monkeypatch):
    from mqvae.evaluation import reports

    model, pixels, dataset = _model_and_data([-1, 1])
    shown = {}
    monkeypatch.setattr(reports, "recon_figure", lambda originals, recons, title: shown.update(x=originals, r=recons))
    RECONSTRUCTION.picture(model, dataset, "cpu", "title")
    indices = evaluation.shown_indices(dataset, 32)
    assert torch.allclose(shown["x"], pixels[indices], atol=1e-7, rtol=0)
    with torch.no_grad():
        expected = ((model(dataset.tensors[0][indices]).output + 1) / 2).clamp(0, 1)
    assert torch.allclose(shown["r"], expected, atol=1e-6, rtol=0)


def test_a_run_wires_the_keys_through(tmp_path):
    write_folder(tmp_path / "folder")
    cfg = tiny_config(data={"name": "image_folder", "root": str(tmp_path / "folder"), "batch_size": 2,
                            "image_size": 32, "random_crop": True, "range": [-1, 1]},
                      quantizer={"kmeans_warmup": 1})
    engine = build_engine(cfg, tmp_path / "run")
    assert engine.model.range == (-1.0, 1.0) and engine.datasets.image_size == 32
    assert engine.datasets.train.random_crop and not engine.datasets.test.random_crop
    assert engine.datasets.train.range == engine.datasets.test.range == (-1.0, 1.0)
    assert all(problem.stream.dataset is engine.datasets.train for problem in engine.problems
               if problem.stream is not None)
    out = tmp_path / "cli"
    assert run.main([str(ROOT / "configs/digits/vqvae.yaml"), "--set", f"data.root={tmp_path / 'folder'}", "--set",
                     "data.name=image_folder", "--set", "data.image_size=32", "--set", "data.random_crop=true",
                     "--set", "data.range=[-1, 1]", "--set", "data.batch_size=2", "--set", "train.iters=2",
                     "--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "device=cpu",
                     "--set", "quantizer.kmeans_warmup=1", "--set", "eval.image_quality=off", "--out", str(out)]) == 0
    assert (out / "recon.png").is_file()


# -- refusals ----------------------------------------------------------------------------------------------------

def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("shape, key", [({"image_size": 32}, "data.image_size"), ({"random_crop": True}, "data.random_crop")])
def test_sets_stored_at_one_size_refuse_another_size_and_random_crops(shape, key):
    with pytest.raises(UserError) as error:
        load_datasets("digits", "", False, 0, **shape)
    assert one_line(error).startswith(key) and "16×16" in str(error.value)
    load_datasets("digits", "", False, 0, image_size=16)  # its own size is no change


@pytest.mark.parametrize("setting, key", [("data.range=[0.5, 1]", "data.range"), ("data.range=[-1, 1, 2]", "data.range"),
                                          ("data.image_size=0", "data.image_size")])
def test_bad_values_are_refused_at_load_in_one_line(setting, key):
    with pytest.raises(UserError) as error:
        load_config(ROOT / "configs/digits/vqvae.yaml", [setting])
    assert f": {key}: " in one_line(error)


def fake_source(folder: Path, **data) -> Path:
    """A folder that looks like a finished run on digits with ``data`` (config.yaml, checkpoint.pt, metrics.json)."""
    folder.mkdir(parents=True)
    write_config(folder, tiny_config(data={"name": "digits", **data}))
    torch.save({}, folder / "checkpoint.pt")
    (folder / "metrics.json").write_text("{}")
    return folder


def test_a_prior_takes_its_sources_image_size_and_range_and_refuses_others(tmp_path):
    # The source's encoder codes the images at the size and in the range it was trained on; a prior config leaves
    # them out (the defaults) or repeats them.
    prior = ROOT / "configs/digits/prior.yaml"
    ranged = fake_source(tmp_path / "ranged", image_size=16, range=[-1, 1])
    cfg = load_config(prior, [f"prior.run={ranged}"])
    assert (cfg.data.image_size, cfg.data.range) == (16, [-1.0, 1.0])
    assert load_config(prior, [f"prior.run={ranged}", "data.range=[-1, 1]"]).data.range == [-1.0, 1.0]
    pixels = fake_source(tmp_path / "pixels")
    for source, setting, key in ((pixels, "data.range=[-1, 1]", "data.range"),
                                 (ranged, "data.image_size=32", "data.image_size"),
                                 (pixels, "data.random_crop=true", "data.random_crop")):
        with pytest.raises(UserError) as error:
            load_config(prior, [f"prior.run={source}", setting])
        assert f": {key}: " in one_line(error), setting
