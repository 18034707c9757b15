"""Named image data sets: each name maps to a function that returns a train/test pair.

A registered loader gives every item as ``(image, label)`` with ``image`` a float32 C×H×W tensor in [0, 1]
(``transforms.ToTensor()``, the scaling of the MQ-VAE paper, App. I) and H == W, at the set's own size;
``load_datasets`` then shapes the pair as the config's ``data`` section says (``shaped``): ``image_size``,
``random_crop`` and ``range``, the interval the network sees pixels in (``to_range``; ``to_pixels`` maps
back, for the metrics and pictures).

Built-in names:

* ``digits`` (default) — scikit-learn's 1797 real 8×8 handwritten digits, shipped
  inside scikit-learn so a run needs no download; upsampled to 16×16 so a VQ-VAE
  with two stride-2 downsamplings has a 4×4 latent.
* ``mnist``, ``fashion_mnist`` — the four IDX files, plain or gzipped, read from ``data.root`` itself
  (Debian's ``dataset-fashion-mnist`` layout) or from torchvision's ``root/<Class>/raw``; 28×28 as
  stored, not padded: zeros around the digit would count in the test MSE and FID. Two stride-2
  downsamplings give a 7×7 latent and the decoder's transposed convolutions return 28×28; three would
  return 24×24, which ``QuantizedNetwork.task_loss`` stops with a one-line error.
* ``cifar10``, ``cifar100``, ``svhn`` — 32×32 RGB as stored.
* ``celeba`` — aligned faces, center-cropped to 140×140 then resized to 64×64 (``data.image_size``);
  used unconditionally, so every label is 0.
* ``image_folder`` — ``root/train/<class>/*`` and ``root/test/<class>/*`` images,
  resized (shorter side) and center-cropped to ``IMAGE_FOLDER_SIZE`` (64) or ``data.image_size``.

``data.image_size`` and ``data.random_crop`` apply to the sets of images of any size (``SquareImages``:
image_folder and celeba). The sets stored at one size (digits, mnist, fashion_mnist, cifar10, cifar100,
svhn) refuse another ``image_size`` and ``random_crop`` with one line when they are loaded: resizing them
would change the data that the paper's numbers are measured on, and there is nothing to crop.

Torchvision sets are read from ``data.root`` in torchvision's own layout and are
downloaded only when ``data.download`` is true.
"""

import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset, TensorDataset

from mqvae.errors import UserError
from mqvae.registry import DATASETS

IMAGE_FOLDER_SIZE = 64

# The digits test set must be the same in every run, whatever the run seed.
_DIGITS_SPLIT_SEED = 20240607
_DIGITS_TRAIN_SIZE = 1500

# What torchvision's readers raise for missing, truncated or foreign files
# (and for failed downloads); anything else is a bug and keeps its traceback.
_READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)

# What PIL raises for a file it cannot decode: unknown format, truncated or damaged data, or (the bomb
# error) more pixels than PIL agrees to decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _fetch_hint(download: bool) -> str:
    # After a failed download, suggesting a download again would not help.
    return "put the files there" + ("" if download else " or set data.download: true")


@dataclass
class Datasets:
    """A train/test pair of ``(image, label)`` sets with the shape facts models need."""

    train: Dataset
    test: Dataset
    channels: int
    image_size: int
    num_classes: int


# The interval the network sees pixels in (``data.range``): a data set's own pixels, [0, 1], or [-1, 1]. Metrics and
# pictures always see [0, 1] (``to_pixels``).
PIXELS = (0.0, 1.0)


def to_range(images: torch.Tensor, range_) -> torch.Tensor:
    """[0, 1] pixels mapped linearly onto ``range_`` = (low, high), as the network sees them: 2x - 1 for [-1, 1]
    (the authors' MQ-GAN code, x / 127.5 - 1 of the bytes). [0, 1] gives ``images`` back, the same tensor."""
    low, high = range_
    return images if (low, high) == PIXELS else images * (high - low) + low


def to_pixels(images: torch.Tensor, range_) -> torch.Tensor:
    """The inverse of ``to_range``: images in ``range_`` as [0, 1] pixels, what metrics and pictures see."""
    low, high = range_
    return images if (low, high) == PIXELS else (images - low) / (high - low)


def register_dataset(name: str):
    """Decorator adding a loader ``fn(root, download, seed) -> Datasets`` under ``name``: images in [0, 1] at the
    set's own size. Return ``SquareImages`` for a set of images of any size, so that ``data.image_size`` and
    ``data.random_crop`` apply to it."""
    return DATASETS.register(name)


def load_datasets(name: str, root: str, download: bool, seed: int, image_size: int | None = None,
                  random_crop: bool = False, range_=PIXELS) -> Datasets:
    """The data set ``name`` (``data.name``), shaped as ``data.image_size``, ``data.random_crop`` and ``data.range``
    say (``shaped``)."""
    if name not in DATASETS:
        raise UserError(f"data.name: {DATASETS.unknown(name)}")
    return shaped(DATASETS[name](root, download, seed), name, image_size, random_crop, range_)


def shaped(datasets: Datasets, name: str, image_size: int | None, random_crop: bool, range_) -> Datasets:
    """``datasets`` (a loader's: [0, 1], its own size) at ``image_size`` (None: its own), its training split
    randomly cropped where ``random_crop``, and every image in ``range_``; with the defaults every image is the
    loader's. Sets that are not ``SquareImages`` refuse another size and random crops with one line."""
    own = datasets.image_size
    squares = isinstance(datasets.train, SquareImages) and isinstance(datasets.test, SquareImages)
    if not squares and image_size not in (None, own):
        raise UserError(f"data.image_size: {image_size}, but {name} holds images of one size, {own}×{own}, which it "
                        f"does not resize; leave image_size null (or {own}), or use a set of images of any size "
                        "(image_folder, celeba)")
    if not squares and random_crop:
        raise UserError(f"data.random_crop: {name} holds images of one size, {own}×{own}, with nothing to crop from; "
                        "random crops apply to sets of images of any size (image_folder, celeba); set it to false")
    size = image_size or own
    if squares:
        train = datasets.train.shaped(size, random_crop, range_)
        test = datasets.test.shaped(size, False, range_)  # test images are always the center crop
    else:
        train, test = (_in_range(split, range_) for split in (datasets.train, datasets.test))
    return replace(datasets, train=train, test=test, image_size=size)


def _in_range(dataset: Dataset, range_) -> Dataset:
    """``dataset`` with its images in ``range_``: a TensorDataset's images mapped once (it keeps the batch stream's
    fast path), any other set's item by item (``InRange``)."""
    if tuple(range_) == PIXELS:
        return dataset
    if isinstance(dataset, TensorDataset):
        images, *rest = dataset.tensors
        return TensorDataset(to_range(images, range_), *rest)
    return InRange(dataset, range_)


class InRange(Dataset):
    """The items of ``dataset``, in its order, with the image of each in ``range``."""

    def __init__(self, dataset: Dataset, range_):
        self.dataset, self.range = dataset, tuple(range_)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, *rest = self.dataset[index]
        return (to_range(image, self.range), *rest)


class SquareImages(Dataset):
    """A set of PIL images of any size (``dataset``'s items are ``(image, label)``) as ``size``×``size`` float
    tensors in ``range``.

    Each image is resized so that its shorter side is ``size`` (torchvision's Resize: PIL's antialiased bilinear),
    then cropped to size×size; with ``window`` (CelebA's 140-px face square) it is cropped to window×window first,
    then resized to size, as the authors' CelebA transform does it. An integer index takes the center crop. With
    ``random_crop`` (a training split), the batch stream asks for items as ``(index, (u, v))``, u and v uniform in
    [0, 1) and a pure function of the stream's seed, the epoch and the index (``loader.BatchStream``); the crop's
    top-left corner is then (floor(u·(H − side + 1)), floor(v·(W − side + 1))), albumentations' RandomCrop, which
    the authors' dataset.py applies after SmallestMaxSize (a resize of the shorter side)."""

    def __init__(self, dataset: Dataset, size: int, window: int | None = None, random_crop: bool = False,
                 range_=PIXELS):
        self.dataset, self.size, self.window = dataset, size, window
        self.random_crop, self.range = random_crop, tuple(range_)

    def shaped(self, size: int, random_crop: bool, range_) -> "SquareImages":
        """The same images at ``size``, randomly cropped or not, in ``range_``."""
        return SquareImages(self.dataset, size, self.window, random_crop, range_)

    def subset(self, indices: list[int]) -> "SquareImages":
        """The items at ``indices``, shaped alike (a hold-out split keeps its random crops)."""
        return SquareImages(Subset(self.dataset, indices), self.size, self.window, self.random_crop, self.range)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        from torchvision.transforms import functional

        index, draw = index if isinstance(index, tuple) else (index, None)
        image, label = self.dataset[index]
        side = self.window or self.size
        if self.window is None:
            image = functional.resize(image, self.size)
        if draw is None:
            image = functional.center_crop(image, side)
        else:
            # min(): u * m may round up to m for u just below 1.
            top, left = (min(int(u * (extent - side + 1)), extent - side) for u, extent in zip(draw, image.size[::-1]))
            image = functional.crop(image, top, left, side, side)
        if self.window is not None:
            image = functional.resize(image, self.size)
        return to_range(functional.to_tensor(image), self.range), label


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off a seeded ``fraction`` of ``dataset``; returns ``(rest, held_out)``.

    A ``TensorDataset`` is split into ``TensorDataset``s so the batch stream's
    fast path still applies, and ``SquareImages`` into ``SquareImages`` so that random crops still do.
    """
    n = len(dataset)
    n_held = round(n * fraction)
    if not 0 < n_held < n:
        raise UserError(f"hold-out fraction {fraction} of {n} items leaves one part empty; use a fraction strictly between 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, rest = order[:n_held], order[n_held:]
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[rest] for t in dataset.tensors)), TensorDataset(*(t[held] for t in dataset.tensors))
    if isinstance(dataset, SquareImages):
        return dataset.subset(rest.tolist()), dataset.subset(held.tolist())
    return Subset(dataset, rest.tolist()), Subset(dataset, held.tolist())


@register_dataset("digits")
def _digits(root: str, download: bool, seed: int) -> Datasets:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Raw values are counts 0..16 of set pixels in 4×4 blocks.
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    # Bilinear interpolation is a convex combination, so values stay in [0, 1].
    images = torch.nn.functional.interpolate(images, size=16, mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    train, test = order[:_DIGITS_TRAIN_SIZE], order[_DIGITS_TRAIN_SIZE:]
    return Datasets(
        train=TensorDataset(images[train], labels[train]),
        test=TensorDataset(images[test], labels[test]),
        channels=1,
        image_size=16,
        num_classes=10,
    )


def _read_pair(title: str, folder: str, expected: str, remedy: str, make: Callable[[bool], Dataset]):
    """``(make(True), make(False))`` — train then test — with read failures as one UserError line."""
    try:
        return make(True), make(False)
    except _READ_ERRORS as err:
        raise UserError(
            f"data.root: no readable {title} files in '{folder}' (expected {expected}; torchvision: {_one_line(err)}); "
            f"{remedy}"
        ) from err


# The four IDX files of an MNIST-like release, train pair first; each may be stored plain or gzipped.
_IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_file(folder: str, name: str) -> str | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (plain first), else None."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> torch.Tensor:
    """An IDX file of unsigned bytes (LeCun's format: big-endian magic 0x0000 08 ndim, ndim big-endian uint32
    sizes, then the values), plain or gzipped, as a uint8 tensor; any fault is one UserError line naming it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip's BadGzipFile is an OSError; a cut stream an EOFError
        raise UserError(f"data.root: cannot read '{path}' ({_one_line(err)}); the file is damaged or truncated") from err
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"data.root: '{path}' is not an IDX file of unsigned bytes (its first bytes are "
                        f"{data[:4].hex() or 'missing'}, expected 000008 and the number of dimensions)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise UserError(f"data.root: '{path}' ends inside its header; the file is truncated")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    size = header + math.prod(shape)
    if len(data) != size:
        raise UserError(f"data.root: '{path}' holds {len(data)} bytes but its header ({'×'.join(map(str, shape))} values) "
                        f"says {size}; the file is {'truncated' if len(data) < size else 'damaged'}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _idx_split(paths: dict[str, str], split: str, title: str) -> TensorDataset:
    """One split's images and labels (``paths``: file name -> path found), checked against each other:
    torchvision's own reader compares neither, so too few labels would end a run with an IndexError at some later
    batch, too many would be dropped silently, and images of another size would reach the model."""
    images_path, labels_path = (paths[name] for name in _IDX_NAMES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        sides = "×".join(map(str, images.shape[1:])) or "no"
        raise UserError(f"data.root: '{images_path}' holds {sides} images; {title} images are 28×28")
    if labels.dim() != 1 or len(labels) != len(images):
        raise UserError(f"data.root: '{images_path}' holds {len(images)} images but '{labels_path}' holds "
                        f"{labels.numel()} labels; use image and label files of the same release")
    if len(labels) and labels.max() > 9:
        raise UserError(f"data.root: '{labels_path}' holds label {labels.max().item()}; {title} labels are 0..9")
    # transforms.ToTensor's scaling (uint8 / 255), as the paper's pipeline; a TensorDataset takes the batch
    # stream's fast path (one gather per batch).
    return TensorDataset(images.unsqueeze(1).float().div_(255), labels.long())


def _mnist_like(class_name: str, title: str, package: str | None = None):
    def load(root: str, download: bool, seed: int) -> Datasets:
        # Two layouts: the four files directly in root, plain or gzipped (Debian's package puts them in
        # /usr/share/datasets/<package>/, gzipped), or torchvision's root/<Class>/raw, where a download lands.
        # The first folder holding any of the files is the one read, so a missing one is named, not skipped.
        folders = [root, os.path.join(root, class_name, "raw")]
        names = [name for pair in _IDX_NAMES.values() for name in pair]
        folder = next((f for f in folders if any(_idx_file(f, name) for name in names)), None)
        if folder is None and download:
            from torchvision import datasets

            folder = folders[1]
            _read_pair(title, folder, ", ".join(names), _fetch_hint(download),
                       lambda train: getattr(datasets, class_name)(root, train=train, download=True))
        if folder is None:
            debian = f"; `apt-get install {package}` puts them in /usr/share/datasets/{package}" if package else ""
            raise UserError(
                f"data.root: no {title} files in '{folders[0]}' or '{folders[1]}' (expected {', '.join(names)}, each "
                f"plain or .gz{debian}); {_fetch_hint(download)}")
        paths = {name: _idx_file(folder, name) for name in names}
        missing = [name for name, path in paths.items() if path is None]
        if missing:
            raise UserError(f"data.root: '{os.path.join(folder, missing[0])}' (or .gz) is missing beside the other "
                            f"{title} files in '{folder}'")
        return Datasets(_idx_split(paths, "train", title), _idx_split(paths, "test", title),
                        channels=1, image_size=28, num_classes=10)

    return load


register_dataset("mnist")(_mnist_like("MNIST", "MNIST"))
register_dataset("fashion_mnist")(_mnist_like("FashionMNIST", "Fashion-MNIST", "dataset-fashion-mnist"))


def _cifar(class_name: str, title: str, expected: str, num_classes: int):
    def load(root: str, download: bool, seed: int) -> Datasets:
        from torchvision import datasets, transforms

        cls = getattr(datasets, class_name)
        train, test = _read_pair(
            title,
            os.path.join(root, cls.base_folder),
            expected,
            _fetch_hint(download),
            lambda is_train: cls(root, train=is_train, transform=transforms.ToTensor(), download=download),
        )
        return Datasets(train, test, channels=3, image_size=32, num_classes=num_classes)

    return load


register_dataset("cifar10")(_cifar("CIFAR10", "CIFAR-10", "data_batch_1..5, test_batch, batches.meta", 10))
register_dataset("cifar100")(_cifar("CIFAR100", "CIFAR-100", "train, test, meta", 100))


@register_dataset("svhn")
def _svhn(root: str, download: bool, seed: int) -> Datasets:
    from torchvision import datasets, transforms

    # torchvision keeps SVHN's .mat files directly in root, not in a subfolder.
    train, test = _read_pair(
        "SVHN",
        root,
        "train_32x32.mat, test_32x32.mat",
        _fetch_hint(download),
        lambda is_train: datasets.SVHN(
            root, split="train" if is_train else "test", transform=transforms.ToTensor(), download=download
        ),
    )
    return Datasets(train, test, channels=3, image_size=32, num_classes=10)


def _unlabelled(_target) -> int:
    # Module-level (not a lambda) so DataLoader workers can pickle it.
    return 0


# CelebA's aligned faces (178×218) are cropped to this central square before they are resized, as in the
# authors' transform (a 140-px crop, then the shorter side resized to image_size).
CELEBA_WINDOW = 140
CELEBA_SIZE = 64


@register_dataset("celeba")
def _celeba(root: str, download: bool, seed: int) -> Datasets:
    from torchvision import datasets

    # CelebA has no class label; "identity" is the cheapest target to carry, replaced by 0.
    train, test = _read_pair(
        "CelebA",
        os.path.join(root, "celeba"),
        "img_align_celeba/, list_eval_partition.txt, identity_CelebA.txt, list_attr_celeba.txt, "
        "list_bbox_celeba.txt, list_landmarks_align_celeba.txt",
        _fetch_hint(download),
        lambda is_train: datasets.CelebA(
            root,
            split="train" if is_train else "test",
            target_type="identity",
            target_transform=_unlabelled,
            download=download,
        ),
    )
    train, test = (SquareImages(_CelebAFiles(faces), CELEBA_SIZE, window=CELEBA_WINDOW) for faces in (train, test))
    return Datasets(train, test, channels=3, image_size=CELEBA_SIZE, num_classes=1)


class _CelebAFiles(Dataset):
    """torchvision's CelebA opens its images itself (no ``loader=``) and lazily: each is decoded here, so that a
    file PIL cannot decode becomes one UserError line naming it, as image_folder's ``_open_rgb`` does."""

    def __init__(self, faces):
        self.faces = faces

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index):
        try:
            image, target = self.faces[index]
            return image.convert("RGB"), target  # decodes every pixel, and closes the file
        except _DECODE_ERRORS as err:
            path = os.path.join(self.faces.root, self.faces.base_folder, "img_align_celeba", self.faces.filename[index])
            raise _unreadable_image(path, err) from err


def _open_rgb(path: str) -> Image.Image:
    """ImageFolder's loader: the image at ``path`` as RGB, or one UserError line naming a file PIL cannot decode."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel, so truncated data fails here, not later
    except _DECODE_ERRORS as err:
        raise _unreadable_image(path, err) from err


def _unreadable_image(path: str, err: Exception) -> UserError:
    # PIL's own message for an unknown format repeats the path.
    reason = "not a known image format" if isinstance(err, UnidentifiedImageError) else _one_line(err)
    return UserError(f"data.root: '{path}' is not a readable image ({reason}); replace or remove the file")


@register_dataset("image_folder")
def _image_folder(root: str, download: bool, seed: int) -> Datasets:
    from torchvision import datasets

    train, test = _read_pair(
        "image",
        root,
        "train/<class>/*.png|jpg and test/<class>/*.png|jpg",
        "create those class subfolders of images (image_folder is never downloaded)",
        lambda is_train: datasets.ImageFolder(os.path.join(root, "train" if is_train else "test"), loader=_open_rgb),
    )
    # ImageFolder numbers classes by sorted folder name, separately per split.
    if train.classes != test.classes:
        raise UserError(
            f"data.root: class folders differ between '{os.path.join(root, 'train')}' ({', '.join(train.classes)}) "
            f"and '{os.path.join(root, 'test')}' ({', '.join(test.classes)}); use the same class folder names in both"
        )
    return Datasets(SquareImages(train, IMAGE_FOLDER_SIZE), SquareImages(test, IMAGE_FOLDER_SIZE), channels=3,
                    image_size=IMAGE_FOLDER_SIZE, num_classes=len(train.classes))
