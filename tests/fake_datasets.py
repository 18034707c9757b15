"""Tiny stand-ins for the paper's data sets, written in their real on-disk formats.

Each writer lays files out where torchvision's own classes look for them under
``root`` and returns what it wrote, so tests can check that values survive the
trip through torchvision's readers. Only the files' md5 sums differ from the
real downloads (see ``skip_md5_checks``).
"""

import gzip
import os
import pickle
import struct

import numpy as np
from PIL import Image


def _pixels(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def skip_md5_checks(monkeypatch) -> None:
    """Keep torchvision's file-existence checks but skip md5 comparison.

    Tiny stand-ins cannot match the real archives' md5 sums; everything else
    (layout, unpickling, reshaping, label mapping) stays torchvision's code.
    """
    from torchvision.datasets import celeba, cifar, svhn, utils

    def exists_only(fpath, md5=None):
        return utils.check_integrity(fpath)

    for module in (cifar, svhn, celeba):
        monkeypatch.setattr(module, "check_integrity", exists_only)


def write_idx(path: str, array: np.ndarray) -> None:
    """IDX: big-endian int32 magic and dimensions, then the raw uint8 values; gzipped when ``path`` ends in .gz.

    The magic's third byte 0x08 says uint8, its last byte the number of dimensions.
    """
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(struct.pack(f">{1 + array.ndim}i", 0x0800 + array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, n_train: int, n_test: int, kind: str = "MNIST", seed: int = 0, layout: str = "torchvision",
                gzipped: bool = False) -> dict:
    """The four IDX files of an MNIST-like release; kind is "MNIST" or "FashionMNIST". ``layout``: "torchvision"
    puts them in ``root/<kind>/raw``, "debian" in ``root`` itself (as Debian's dataset-fashion-mnist does, in
    /usr/share/datasets/fashion-mnist); ``gzipped`` writes ``*.gz`` files."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, kind, "raw") if layout == "torchvision" else str(root)
    os.makedirs(raw, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    written = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        images, labels = _pixels(rng, (n, 28, 28)), rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
        written[split] = (images, labels)
    return written


def _pickle(path: str, obj: dict) -> None:
    # The real batches are Python 2 pickles whose str keys torchvision reads
    # back as str (encoding="latin1"), so the stand-ins use str keys too.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_images(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows as stored: N×3072 channel-major, same images as N×32×32×3)."""
    images = _pixels(rng, (n, 32, 32, 3))
    return images.transpose(0, 3, 1, 2).reshape(n, 3072), images


def write_cifar10(root, n_per_batch: int, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    written = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows, images = _cifar_images(rng, n_per_batch)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        _pickle(os.path.join(folder, name), {"batch_label": name, "data": rows, "labels": labels})
        split = "test" if name == "test_batch" else "train"
        written[split][0].append(images)
        written[split][1].extend(labels)
    _pickle(os.path.join(folder, "batches.meta"), {"label_names": [f"class{i}" for i in range(10)]})
    return {split: (np.concatenate(images), np.array(labels)) for split, (images, labels) in written.items()}


def write_cifar100(root, n: int, seed: int = 0) -> dict:
    """``root/cifar-100-python`` with train, test, meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split in ("train", "test"):
        rows, images = _cifar_images(rng, n)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = [label // 5 for label in fine]
        _pickle(os.path.join(folder, split), {"data": rows, "fine_labels": fine, "coarse_labels": coarse})
        written[split] = (images, np.array(fine))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    _pickle(os.path.join(folder, "meta"), meta)
    return written


def write_svhn(root, n: int, seed: int = 0) -> dict:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat``: X is H×W×3×N, y is N×1 with 10 for digit 0.

    Returns images as N×32×32×3 and labels as the digits (0..9) torchvision should report.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    written = {}
    for split in ("train", "test"):
        images = _pixels(rng, (n, 32, 32, 3))
        digits = np.arange(n) % 10  # every digit, including 0, appears
        stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": images.transpose(1, 2, 3, 0), "y": stored})
        written[split] = (images, digits)
    return written


def _grey_image(path: str, size: tuple[int, int], value: int, frame: int = 0) -> None:
    """One grey level per image, which resizing, cropping and JPEG keep (nearly) exact.

    A white border ``frame`` pixels wide lets a test see whether a crop removed it.
    """
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((value, value, value), (frame, frame, size[0] - frame, size[1] - frame))
    image.save(path)


def write_image_folder(root, n: int, classes=("cat", "dog"), size: int = 80) -> dict:
    """``root/{train,test}/<class>/*.png``, n images per class and split.

    Returns ``{split: [(grey_value, class_index), ...]}`` in ImageFolder's order.
    """
    written = {}
    for split in ("train", "test"):
        written[split] = []
        for class_index, name in enumerate(sorted(classes)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                value = 10 + 100 * class_index + 10 * i + (5 if split == "test" else 0)
                _grey_image(os.path.join(folder, f"{i:03d}.png"), (size, size), value)
                written[split].append((value, class_index))
    return written


def write_celeba(root, n: int) -> dict:
    """``root/celeba`` with img_align_celeba/*.jpg (178×218) and the five list files.

    Images are split train/valid/test by position (i % 3 == 0, 1, 2); ``n`` must
    be at least 6 so each split has two images (torchvision squeezes a 1-image
    split to a scalar). Returns ``{split: [grey_value, ...]}``.
    """
    folder = os.path.join(root, "celeba")
    images = os.path.join(folder, "img_align_celeba")
    os.makedirs(images, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    partition = [i % 3 for i in range(n)]
    written = {"train": [], "valid": [], "test": []}
    for i, name in enumerate(names):
        value = 20 + (200 * i) // n
        # The 16-pixel frame lies just outside the central 140×140 crop, in whole JPEG blocks.
        _grey_image(os.path.join(images, name), (178, 218), value, frame=16)
        written[("train", "valid", "test")[partition[i]]].append(value)

    def write(filename: str, rows: list[str], header: str | None = None) -> None:
        # Files with a header start with the row count, then the column names.
        lines = [str(n), header] if header is not None else []
        with open(os.path.join(folder, filename), "w") as f:
            f.write("\n".join(lines + rows) + "\n")

    attributes = [f"Attr{j}" for j in range(40)]
    write("list_eval_partition.txt", [f"{name} {p}" for name, p in zip(names, partition)])
    write("identity_CelebA.txt", [f"{name} {1 + i % 4}" for i, name in enumerate(names)])
    write("list_attr_celeba.txt", [f"{name} " + " ".join(["1", "-1"] * 20) for name in names], " ".join(attributes))
    write("list_bbox_celeba.txt", [f"{name} 10 20 100 120" for name in names], "image_id x_1 y_1 width height")
    landmarks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    write("list_landmarks_align_celeba.txt", [f"{name} " + " ".join(["70"] * 10) for name in names], landmarks)
    return written
