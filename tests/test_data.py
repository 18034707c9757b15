import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fake_datasets import (
    skip_md5_checks,
    write_celeba,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_mnist,
    write_idx,
    write_svhn,
)
import mqvae.data
from mqvae.data import DATASETS, Datasets, holdout_split, load_datasets, register_dataset
from mqvae.errors import UserError
from mqvae.evaluation.evaluate import labels_of
from mqvae.data.loader import BatchStream


def _load(name, root):
    return load_datasets(name, str(root), download=False, seed=0)


def _one_line_error(error, *needles) -> str:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return message


def test_digits_shapes_range_and_labels():
    sets = _load("digits", "/nonexistent")
    assert (sets.channels, sets.image_size, sets.num_classes) == (1, 16, 10)
    assert isinstance(sets.train, TensorDataset) and isinstance(sets.test, TensorDataset)
    images, labels = sets.train.tensors
    assert images.shape == (1500, 1, 16, 16) and images.dtype == torch.float32
    assert len(sets.test) == 297
    assert images.min() >= 0 and images.max() <= 1
    assert images.max() > 0.9  # scaled by 16, not 255
    assert set(labels.tolist()) == set(range(10))


def _bilinear_x2(images: np.ndarray) -> np.ndarray:
    """Independent reference for 2× bilinear upsampling (half-pixel centres, edges clamped).

    Output pixel 2i sits a quarter pixel before input i and 2i+1 a quarter after,
    so they weigh input i by 3/4 and its neighbour on that side by 1/4.
    """
    n = images.shape[-1]
    weights = np.zeros((2 * n, n))
    for i in range(n):
        weights[2 * i, i] += 0.75
        weights[2 * i, max(i - 1, 0)] += 0.25
        weights[2 * i + 1, i] += 0.75
        weights[2 * i + 1, min(i + 1, n - 1)] += 0.25
    return weights @ images @ weights.T


def test_digits_are_sklearn_digits_split_fixed_and_disjoint():
    from sklearn.datasets import load_digits

    raw = load_digits()
    reference = torch.from_numpy(_bilinear_x2(raw.images / 16.0)).float().flatten(1)
    first = _load("digits", "/nonexistent")
    images = torch.cat([first.train.tensors[0], first.test.tensors[0]]).flatten(1)
    labels = torch.cat([first.train.tensors[1], first.test.tensors[1]])
    distances, source = torch.cdist(images, reference).min(1)
    assert distances.max() < 1e-5
    # Every raw image (they are all distinct) lands in exactly one split.
    assert sorted(source.tolist()) == list(range(len(raw.images)))
    assert torch.equal(labels, torch.from_numpy(raw.target)[source])
    # A different run seed must not move the split.
    second = load_datasets("digits", "/x", download=False, seed=123)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("layout, gzipped", [("torchvision", False), ("debian", True), ("debian", False),
                                             ("torchvision", True)])
def test_mnist_and_fashion_mnist_come_at_native_28_px_unpadded(tmp_path, layout, gzipped):
    # Both layouts (torchvision's root/<Class>/raw and Debian's files directly in root), plain or gzipped, through
    # the real loader; the pixels are compared with what was written.
    for name, kind in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")):
        root = tmp_path / kind
        written = write_mnist(root, n_train=5, n_test=3, kind=kind, seed=len(kind), layout=layout, gzipped=gzipped)
        sets = _load(name, root)
        assert (sets.channels, sets.image_size, sets.num_classes) == (1, 28, 10)
        for split, dataset in (("train", sets.train), ("test", sets.test)):
            images, labels = written[split]
            assert len(dataset) == len(labels)
            for i in range(len(labels)):
                image, label = dataset[i]
                # Every pixel is a stored one: no zero border to count in the MSE or FID.
                assert image.shape == (1, 28, 28) and image.dtype == torch.float32
                assert torch.equal(image[0], torch.from_numpy(images[i]).float() / 255)
                assert label == labels[i]


def _check_rgb32(dataset, images, labels):
    assert len(dataset) == len(labels)
    for i in range(len(labels)):
        image, label = dataset[i]
        assert image.shape == (3, 32, 32)
        expected = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255
        assert torch.equal(image, expected)
        assert label == labels[i]


def test_cifar10_round_trip(tmp_path, monkeypatch):
    skip_md5_checks(monkeypatch)
    written = write_cifar10(tmp_path, n_per_batch=2)
    sets = _load("cifar10", tmp_path)
    assert (sets.channels, sets.image_size, sets.num_classes) == (3, 32, 10)
    _check_rgb32(sets.train, *written["train"])
    _check_rgb32(sets.test, *written["test"])
    assert len(sets.train) == 10


def test_cifar100_round_trip(tmp_path, monkeypatch):
    skip_md5_checks(monkeypatch)
    written = write_cifar100(tmp_path, n=4)
    sets = _load("cifar100", tmp_path)
    assert sets.num_classes == 100
    _check_rgb32(sets.train, *written["train"])
    _check_rgb32(sets.test, *written["test"])


def test_svhn_round_trip_maps_label_10_to_0(tmp_path, monkeypatch):
    skip_md5_checks(monkeypatch)
    written = write_svhn(tmp_path, n=12)
    sets = _load("svhn", tmp_path)
    assert (sets.channels, sets.image_size, sets.num_classes) == (3, 32, 10)
    _check_rgb32(sets.train, *written["train"])
    _check_rgb32(sets.test, *written["test"])
    assert sets.train[0][1] == 0 and sets.train[10][1] == 0


def test_image_folder_round_trip(tmp_path):
    written = write_image_folder(tmp_path, n=2, classes=("dog", "cat"))
    sets = _load("image_folder", tmp_path)
    assert (sets.channels, sets.image_size, sets.num_classes) == (3, 64, 2)
    for split, dataset in (("train", sets.train), ("test", sets.test)):
        assert len(dataset) == len(written[split])
        for i, (value, class_index) in enumerate(written[split]):
            image, label = dataset[i]
            assert image.shape == (3, 64, 64)
            assert torch.allclose(image, torch.full_like(image, value / 255), atol=1e-6)
            assert label == class_index


def test_the_labels_of_every_format_are_read_without_its_images(tmp_path, monkeypatch):
    # recon.png takes the classes in turn (evaluation.shown_indices) from each format's own list of labels, which
    # must be the labels its items carry; CelebA has no class label.
    skip_md5_checks(monkeypatch)
    write_mnist(tmp_path / "mnist", n_train=5, n_test=3)
    write_cifar10(tmp_path / "cifar10", n_per_batch=2)
    write_svhn(tmp_path / "svhn", n=12)  # SVHN's label 10 is 0
    write_image_folder(tmp_path / "image_folder", n=2, classes=("dog", "cat"))
    for name in ("digits", "mnist", "cifar10", "svhn", "image_folder"):
        sets = _load(name, tmp_path / name)
        _, held_out = holdout_split(sets.train, 0.5, seed=0)  # a Subset, for the sets that are not tensors
        for dataset in (sets.test, held_out):
            assert labels_of(dataset).tolist() == [int(dataset[i][1]) for i in range(len(dataset))], name
    write_celeba(tmp_path / "celeba", n=9)
    assert labels_of(_load("celeba", tmp_path / "celeba").test) is None


def test_image_folder_class_mismatch(tmp_path):
    write_image_folder(tmp_path, n=1, classes=("cat", "dog"))
    write_image_folder(tmp_path / "other", n=1, classes=("cow",))
    (tmp_path / "other" / "test" / "cow").rename(tmp_path / "test" / "cow")
    with pytest.raises(UserError, match="class folders differ"):
        _load("image_folder", tmp_path)


def _truncated_png(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, reason",
    [(lambda path: path.write_bytes(np.random.default_rng(0).bytes(300)), "not a known image format"),
     (_truncated_png, "truncated")],
    ids=["random_bytes", "truncated_png"],
)
def test_undecodable_image_is_one_line_naming_the_file(tmp_path, damage, reason):
    write_image_folder(tmp_path, n=3)
    bad = tmp_path / "train" / "dog" / "001.png"
    damage(bad)
    sets = _load("image_folder", tmp_path)  # ImageFolder lists files; it decodes them only when read
    with pytest.raises(UserError) as error:
        for _ in BatchStream(sets.train, batch_size=2, seed=0):
            pass
    message = _one_line_error(error, f"'{bad}'", reason)
    assert message.startswith("data.root:")


def _mnist_raw(root):
    return root / "MNIST" / "raw"


def test_mnist_label_count_differs_from_image_count(tmp_path):
    write_mnist(tmp_path, n_train=5, n_test=3)
    labels = _mnist_raw(tmp_path) / "train-labels-idx1-ubyte"
    write_idx(str(labels), np.zeros(4, dtype=np.uint8))
    with pytest.raises(UserError) as error:
        _load("mnist", tmp_path)
    _one_line_error(error, f"'{_mnist_raw(tmp_path) / 'train-images-idx3-ubyte'}' holds 5 images", f"'{labels}' holds 4 labels")


def test_fashion_mnist_images_of_another_size(tmp_path):
    write_mnist(tmp_path, n_train=5, n_test=3, kind="FashionMNIST")
    images = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    write_idx(str(images), np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, f"'{images}' holds 32×32 images", "Fashion-MNIST images are 28×28")


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path, n_train=5, n_test=3)
    labels = _mnist_raw(tmp_path) / "t10k-labels-idx1-ubyte"
    write_idx(str(labels), np.array([1, 10, 2], dtype=np.uint8))
    with pytest.raises(UserError) as error:
        _load("mnist", tmp_path)
    _one_line_error(error, f"'{labels}' holds label 10", "0..9")


IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _listing(folder):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir())


def test_debian_layout_mixes_plain_and_gzipped_files_and_writes_nothing(tmp_path):
    written = write_mnist(tmp_path, n_train=6, n_test=4, kind="FashionMNIST", layout="debian", gzipped=True)
    # One file unpacked by hand beside the gzipped ones: read as it is.
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    before = _listing(tmp_path)
    tmp_path.chmod(0o555)  # the package's folder is read-only to a user: the loader must not write there
    try:
        sets = _load("fashion_mnist", tmp_path)
    finally:
        tmp_path.chmod(0o755)
    assert _listing(tmp_path) == before
    assert torch.equal(sets.test.tensors[1], torch.from_numpy(written["test"][1]).long())
    assert torch.equal(sets.train.tensors[0][:, 0], torch.from_numpy(written["train"][0]).float() / 255)


@pytest.mark.parametrize("layout", ["debian", "torchvision"])
@pytest.mark.parametrize("gzipped", [False, True])
def test_a_missing_idx_file_is_one_line_naming_it(tmp_path, layout, gzipped):
    write_mnist(tmp_path, n_train=5, n_test=3, kind="FashionMNIST", layout=layout, gzipped=gzipped)
    folder = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    (folder / ("t10k-images-idx3-ubyte" + (".gz" if gzipped else ""))).unlink()
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, f"'{folder / 't10k-images-idx3-ubyte'}' (or .gz) is missing")


def test_no_idx_files_names_both_layouts_and_the_debian_package(tmp_path):
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, f"'{tmp_path}'", f"'{tmp_path / 'FashionMNIST' / 'raw'}'", *IDX_NAMES,
                    "apt-get install dataset-fashion-mnist", "data.download: true")


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("cut", [3, 10, 500])  # inside the magic, inside the header, inside the pixels
def test_a_truncated_idx_file_is_one_line_naming_it(tmp_path, gzipped, cut):
    write_mnist(tmp_path, n_train=5, n_test=3, kind="FashionMNIST", layout="debian", gzipped=gzipped)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gzipped else ""))
    data = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    path.write_bytes(gzip.compress(data[:cut]) if gzipped else data[:cut])
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, f"'{path}'")


def test_a_cut_gzip_stream_and_a_foreign_file_are_one_line_naming_them(tmp_path):
    write_mnist(tmp_path, n_train=5, n_test=3, kind="FashionMNIST", layout="debian", gzipped=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])  # the gzip stream itself ends early
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, f"'{path}'", "damaged or truncated")
    path.write_bytes(b"PK\x03\x04 not gzip at all")
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, f"'{path}'")
    path.unlink()
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros((5, 2), dtype=np.uint8))  # labels of 2 dimensions
    with pytest.raises(UserError) as error:
        _load("fashion_mnist", tmp_path)
    _one_line_error(error, "holds 10 labels")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist_package_is_the_real_data_set():
    sets = _load("fashion_mnist", DEBIAN_FASHION_MNIST)
    images, labels = sets.train.tensors
    assert images.shape == (60000, 1, 28, 28) and len(sets.test) == 10000
    # Each class holds 6000 training and 1000 test images, and the training pixels' mean is the published 0.2860.
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(sets.test.tensors[1]).tolist() == [1000] * 10
    assert float(images.mean()) == pytest.approx(0.2860, abs=5e-5)


def test_cifar_and_svhn_files_other_than_the_release_are_refused(tmp_path):
    # torchvision compares every CIFAR and SVHN file with the release's md5 (these stand-ins differ), so a
    # batch of the wrong shape or a .mat file whose counts disagree never reaches training; data.py checks
    # neither, and this test fails first should that guard ever go.
    write_cifar10(tmp_path, n_per_batch=2)
    with pytest.raises(UserError) as error:
        _load("cifar10", tmp_path)
    _one_line_error(error, f"'{tmp_path / 'cifar-10-batches-py'}'", "corrupted")
    write_svhn(tmp_path, n=4)
    with pytest.raises(UserError) as error:
        _load("svhn", tmp_path)
    _one_line_error(error, f"'{tmp_path}'", "corrupted")


def test_an_undecodable_celeba_image_is_one_line_naming_the_file(tmp_path, monkeypatch):
    skip_md5_checks(monkeypatch)
    write_celeba(tmp_path, n=9)
    damaged = tmp_path / "celeba" / "img_align_celeba" / "000001.jpg"  # the first training image
    damaged.write_bytes(damaged.read_bytes()[:200])
    sets = _load("celeba", tmp_path)
    with pytest.raises(UserError) as error:
        sets.train[0]
    assert "\n" not in str(error.value) and str(damaged) in str(error.value)


def test_celeba_round_trip(tmp_path, monkeypatch):
    skip_md5_checks(monkeypatch)
    written = write_celeba(tmp_path, n=9)
    sets = _load("celeba", tmp_path)
    assert (sets.channels, sets.image_size, sets.num_classes) == (3, 64, 1)
    for split, dataset in (("train", sets.train), ("test", sets.test)):
        assert len(dataset) == len(written[split]) == 3
        for i, value in enumerate(written[split]):
            image, label = dataset[i]
            assert image.shape == (3, 64, 64)
            # A uniform result means the white frame was cropped away; JPEG may
            # shift a flat grey by a level or two.
            assert (image - value / 255).abs().max() <= 3 / 255
            assert label == 0


@pytest.mark.parametrize(
    "name, subfolder",
    [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("image_folder", ""), ("svhn", ""), ("celeba", "celeba")],
)
def test_missing_folder_is_one_line_user_error(tmp_path, name, subfolder):
    root = tmp_path / "absent"
    with pytest.raises(UserError) as error:
        _load(name, root)
    message = str(error.value)
    assert "\n" not in message
    assert f"'{(root / subfolder) if subfolder else root}'" in message
    assert message.startswith("data.root:")
    assert ("data.download: true" in message) == (name != "image_folder")


def test_corrupt_cifar_file_is_user_error(tmp_path, monkeypatch):
    skip_md5_checks(monkeypatch)
    write_cifar10(tmp_path, n_per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_1..5"):
        _load("cifar10", tmp_path)


def test_unknown_name_lists_registered_names():
    with pytest.raises(UserError) as error:
        _load("imagenet", "/x")
    assert "imagenet" in str(error.value)
    assert all(name in str(error.value) for name in ("digits", "mnist", "cifar10", "image_folder"))


def test_register_dataset_adds_a_name():
    # (conftest's registries_put_back removes the name afterwards, so it does not leak into other tests)
    tiny = TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))

    @register_dataset("tiny")
    def _tiny(root, download, seed):
        return Datasets(tiny, tiny, channels=1, image_size=2, num_classes=1)

    assert load_datasets("tiny", "/x", download=False, seed=0).train is tiny
    assert "tiny" in mqvae.data.DATASETS
    register_dataset("tiny")(_tiny)  # the same loader again (a module imported twice) changes nothing
    with pytest.raises(UserError, match="twice"):
        register_dataset("tiny")(lambda root, download, seed: None)  # another one would silently replace it


def test_holdout_split_tensor_dataset():
    data = TensorDataset(torch.arange(100).float(), torch.arange(100))
    rest, held = holdout_split(data, 0.2, seed=3)
    assert isinstance(rest, TensorDataset) and isinstance(held, TensorDataset)
    assert len(held) == 20 and len(rest) == 80
    ids = torch.cat([rest.tensors[1], held.tensors[1]])
    assert sorted(ids.tolist()) == list(range(100))
    assert torch.equal(rest.tensors[0].long(), rest.tensors[1])  # rows stay aligned
    assert torch.equal(holdout_split(data, 0.2, seed=3)[1].tensors[1], held.tensors[1])
    assert not torch.equal(holdout_split(data, 0.2, seed=4)[1].tensors[1], held.tensors[1])


def test_holdout_split_generic_dataset():
    data = list(range(10))
    rest, held = holdout_split(data, 0.3, seed=0)
    assert sorted([rest[i] for i in range(len(rest))] + [held[i] for i in range(len(held))]) == data
    assert len(held) == 3


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01])
def test_holdout_split_rejects_empty_part(fraction):
    with pytest.raises(UserError):
        holdout_split(list(range(10)), fraction, seed=0)

