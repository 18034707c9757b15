"""data.on_device: a training set that lives on the device, gathered there by index, gives the batches, the order and
the resume of the host stream, so runs do not change; ``true`` where it cannot be honoured is one line.

The references are independent of the stream: the documented order (``torch.randperm`` seeded by
seed * 100003 + epoch, split into batches and each batch into the ranks' consecutive slices) applied to the data
set's tensors, and a set read item by item through torch's DataLoader. The tests marked ``cuda`` need a CUDA device
(the device path, the pinned copies) and are skipped without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from engines.experiment import build_engine, initialize_codebook
from engines.run_folder import resume_config, write_config
from helpers import draw, measured, tiny_config
from mqvae.config import load_config
from mqvae.data import SquareImages, load_datasets
from mqvae.data.loader import ON_DEVICE_SHARE, BatchStream, place, to_move
from mqvae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the device path and the pinned copies need a CUDA "
                                                                "device; this machine has none")

N = 23


def images_and_labels():
    """N items whose image holds its own index, so that every batch shows which items it holds."""
    images = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 1, 2, 2).clone()
    return images, torch.arange(N)


class Items(Dataset):
    """The same items read one by one: the host stream, through DataLoader."""

    def __len__(self):
        return N

    def __getitem__(self, index):
        images, labels = images_and_labels()
        return images[index], int(labels[index])


def reference(seed: int, epoch: int, batch_size: int, rank: int = 0, ranks: int = 1, drop_last: bool = True):
    """This rank's label batches of one epoch, from the documented order (mqvae.data.loader, _EPOCH_STRIDE)."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    count = N // batch_size if drop_last else -(-N // batch_size)
    share = batch_size // ranks
    return [order[b * batch_size:(b + 1) * batch_size][rank * share:(rank + 1) * share] for b in range(count)]


def take(stream, count):
    """``count`` batches as (images, labels) on the CPU."""
    return [(x.cpu(), y.cpu()) for x, y in draw(stream, count)]


def labels(batches):
    return [y.tolist() for _, y in batches]


# -- the stream: order, sharding, resume ---------------------------------------------------------------------------

@pytest.mark.parametrize("ranks, drop_last", [(1, True), (2, True), (3, False)])
def test_on_device_stream_has_the_host_streams_order_shards_and_images(ranks, drop_last):
    batch_size = 6
    for rank in range(ranks):
        on_device = BatchStream(TensorDataset(*images_and_labels()), batch_size, seed=5, drop_last=drop_last,
                                shard=(rank, ranks))
        host = BatchStream(Items(), batch_size, seed=5, drop_last=drop_last, shard=(rank, ranks))
        assert on_device.on_device and not host.on_device
        per_epoch = len(on_device)
        ours, theirs = take(on_device, 3 * per_epoch), take(host, 3 * per_epoch)
        expected = [batch for epoch in range(3) for batch in reference(5, epoch, batch_size, rank, ranks, drop_last)]
        assert labels(ours) == labels(theirs) == expected
        for (x, y), (host_x, _) in zip(ours, theirs):
            assert torch.equal(x, host_x) and torch.equal(x[:, 0, 0, 0].long(), y)


@pytest.mark.parametrize("consumed", [2, 3, 7])  # 3 batches per epoch: mid-epoch, at the boundary, in the third
def test_on_device_stream_resumes_where_the_host_stream_does(consumed):
    def streams(rank):
        return (BatchStream(TensorDataset(*images_and_labels()), 6, seed=9, shard=(rank, 2)),
                BatchStream(Items(), 6, seed=9, shard=(rank, 2)))

    for rank in range(2):
        uninterrupted = labels(take(streams(rank)[1], consumed + 5))
        for first in streams(rank):
            assert labels(take(first, consumed)) == uninterrupted[:consumed]
            state = first.state_dict()
            for resumed in streams(rank):  # either kind resumes either kind's state
                resumed.load_state_dict(state)
                assert labels(take(resumed, 5)) == uninterrupted[consumed:]


# -- where a set goes ----------------------------------------------------------------------------------------------

def sized(floats: int, longs: int) -> TensorDataset:
    """A tensor set of 4 * floats + 8 * longs bytes."""
    return TensorDataset(torch.zeros(longs, floats // longs, dtype=torch.float32), torch.zeros(longs, dtype=torch.long))


def test_auto_moves_a_tensor_set_of_at_most_a_quarter_of_the_free_memory(monkeypatch):
    dataset = sized(40, 10)  # 160 + 80 = 240 bytes
    for free, moves in [(960, True), (959, False), (10**9, True)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        assert to_move(dataset, "auto", "cuda", "digits") is moves, free
        assert to_move(dataset, False, "cuda", "digits") is False
    assert ON_DEVICE_SHARE == 0.25  # the 960 above: 240 / 0.25


def test_true_moves_a_tensor_set_that_fits_and_refuses_one_that_does_not(monkeypatch):
    dataset = sized(40, 10)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (240, 1000))
    assert to_move(dataset, True, "cuda", "digits") is True  # above auto's quarter, but it fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (239, 1000))
    with pytest.raises(UserError) as error:
        to_move(dataset, True, "cuda", "digits")
    message = str(error.value)
    assert "\n" not in message and message.startswith("data.on_device: true") and "auto or false" in message
    assert "free on cuda" in message


def test_nothing_moves_on_the_cpu():
    dataset = TensorDataset(*images_and_labels())
    for value in ("auto", True, False):
        assert to_move(dataset, value, "cpu", "digits") is False
        assert place(dataset, value, "cpu", "digits") is dataset


def crops() -> SquareImages:
    return SquareImages([(Image.new("RGB", (6, 5)), 0)] * 3, size=4, random_crop=True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_true_on_a_set_read_item_by_item_is_one_line_and_auto_keeps_it_on_the_host(device):
    for dataset in (Items(), crops()):
        with pytest.raises(UserError) as error:
            to_move(dataset, True, device, "image_folder")
        message = str(error.value)
        assert "\n" not in message and message.startswith("data.on_device: true, but the training set of image_folder")
        assert type(dataset).__name__ in message and "auto or false" in message
        assert to_move(dataset, "auto", device, "image_folder") is False
        assert place(dataset, False, device, "image_folder") is dataset


def test_a_run_with_true_on_random_crops_stops_in_one_line(tmp_path):
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "folder" / split / label).mkdir(parents=True)
            Image.new("RGB", (12, 10)).save(tmp_path / "folder" / split / label / "0.png")
    cfg = tiny_config(data={"name": "image_folder", "root": str(tmp_path / "folder"), "batch_size": 2,
                            "image_size": 8, "random_crop": True, "on_device": True})
    with pytest.raises(UserError) as error:
        build_engine(cfg, tmp_path / "run")
    assert "\n" not in str(error.value) and "data.on_device: true" in str(error.value)
    assert "SquareImages" in str(error.value)


# -- the key ---------------------------------------------------------------------------------------------------------

def test_the_key_takes_auto_true_and_false_and_refuses_the_rest_in_one_line(tmp_path):
    digits = ROOT / "configs/digits/mqvae.yaml"
    assert load_config(digits).data.on_device == "auto"
    for text, value in [("auto", "auto"), ("true", True), ("false", False)]:
        assert load_config(digits, [f"data.on_device={text}"]).data.on_device == value
        (tmp_path / "c.yaml").write_text(f"levels: [{{name: a, problem: VQVAE}}]\ndata:\n  on_device: {text}\n")
        assert load_config(tmp_path / "c.yaml").data.on_device == value
    for bad, expected in [("yes_please", "choose one of auto, true, false"), ("1", "expected true or false or a string"),
                          ("null", "expected true or false or a string"), ("[true]", "expected true or false or a string")]:
        with pytest.raises(UserError) as error:
            load_config(digits, [f"data.on_device={bad}"])
        assert "\n" not in str(error.value) and "data.on_device" in str(error.value) and expected in str(error.value)


# -- runs -----------------------------------------------------------------------------------------------------------

# configs/digits/mqvae.yaml at a test's size: k-means after 2 warm-up steps, 6 iterations, a checkpoint at 3.
SMALL = ["model.hidden_channels=8", "model.res_channels=4", "model.num_res_blocks=1", "quantizer.num_codes=16",
         "quantizer.dim=4", "quantizer.kmeans_warmup=2", "data.batch_size=16", "train.iters=6", "train.log_every=1",
         "train.eval_every=3", "train.checkpoint_every=3", "eval.image_quality=off"]


def small(device: str, on_device, *sets):
    text = {True: "true", False: "false"}.get(on_device, on_device)
    return load_config(ROOT / "configs/digits/mqvae.yaml", [*SMALL, f"device={device}", f"data.on_device={text}", *sets])


def same_state(a, b, where="checkpoint") -> None:
    """Checkpoints equal bit for bit, but for the training time (wall clock)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if key != "train_time":
                same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}.{i}")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    else:
        assert a == b, where


def test_true_false_and_auto_give_the_same_batches_on_the_cpu(tmp_path):
    images, _ = load_datasets("digits", "data", False, 0).train.tensors
    expected = [images[order] for order in reference_digits(seed=0, batch_size=16, count=4)]
    for value in ("auto", True, False):
        engine = build_engine(small("cpu", value), tmp_path / str(value))
        stream = engine.autoencoder.stream  # the run's training stream (the codebook shares its batch)
        assert stream.on_device and engine.codebook.stream is None
        assert all(torch.equal(x, want) for (x, _), want in zip(take(stream, 4), expected))


def reference_digits(seed: int, batch_size: int, count: int):
    order = torch.randperm(1500, generator=torch.Generator().manual_seed(seed * 100003))
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def trained(cfg, run_dir: Path):
    """A run as run_experiment makes it, but for the final evaluation and pictures: log.jsonl and checkpoint.pt."""
    run_dir.mkdir()
    engine = build_engine(cfg, run_dir)
    engine.write_config()
    initialize_codebook(engine)
    engine.run()
    engine.save()
    return engine


def test_true_and_false_give_one_run_on_the_cpu(tmp_path):
    engines = {value: trained(small("cpu", value), tmp_path / str(value)) for value in (True, False)}
    assert engines[True].autoencoder.stream.on_device and engines[False].autoencoder.stream.on_device
    logs = {value: measured(tmp_path / str(value)) for value in engines}
    assert len(logs[True]) == 6 + 2  # a record per iteration, an evaluation at 3 and 6
    assert logs[True] == logs[False]
    same_state(*(torch.load(tmp_path / str(value) / "checkpoint.pt", weights_only=False) for value in engines))


def test_a_run_may_resume_with_another_value(tmp_path):
    """The batches are the same whatever the value, so a run trained with one may go on with another (on another
    machine, say); a key that changes what is trained still may not change."""
    write_config(tmp_path, small("cpu", False))
    assert resume_config(tmp_path, ["data.on_device=true"]).data.on_device is True
    with pytest.raises(UserError, match="data.batch_size"):
        resume_config(tmp_path, ["data.batch_size=8"])


# -- on a CUDA device ------------------------------------------------------------------------------------------------

def cuda_streams(kind: str, rank: int, num_workers: int = 0):
    """A stream on the CUDA device of each kind: a tensor set there (on_device), a tensor set on the host (pinned
    gathers) and a set read item by item (DataLoader, pinned)."""
    images, labels_ = images_and_labels()
    dataset = {"on_device": lambda: TensorDataset(images.cuda(), labels_.cuda()),
               "host_tensors": lambda: TensorDataset(images, labels_),
               "items": Items}[kind]()
    return BatchStream(dataset, 6, seed=3, shard=(rank, 2), num_workers=num_workers, device="cuda")


@cuda
@pytest.mark.parametrize("kind, num_workers", [("on_device", 0), ("host_tensors", 0), ("items", 0), ("items", 2)])
def test_cuda_streams_deliver_the_host_streams_batches_without_a_host_sync(kind, num_workers):
    for rank in range(2):
        host = BatchStream(Items(), 6, seed=3, shard=(rank, 2))
        expected = take(host, 8)
        first, resumed = cuda_streams(kind, rank, num_workers), cuda_streams(kind, rank, num_workers)
        assert first.on_device is (kind == "on_device")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a blocking copy or any other host sync raises
        try:
            delivered = draw(first, 4)  # 3 batches per epoch: one into the second
            resumed.load_state_dict(first.state_dict())
            delivered += draw(resumed, 4)  # the rest of the second epoch, and into the third
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(t.is_cuda for batch in delivered for t in batch)
        for (x, y), (hx, hy) in zip(delivered, expected):
            assert torch.equal(x.cpu(), hx) and torch.equal(y.cpu(), hy)


@cuda
def test_place_puts_a_tensor_set_on_cuda_and_the_run_uses_it(tmp_path):
    images, labels_ = images_and_labels()
    placed = place(TensorDataset(images, labels_), "auto", "cuda", "test")
    assert all(t.is_cuda for t in placed.tensors) and torch.equal(placed.tensors[0].cpu(), images)
    for value, on_device in [("auto", True), (True, True), (False, False)]:
        engine = build_engine(small("cuda", value), tmp_path / str(value))
        assert engine.autoencoder.stream.on_device is on_device
        assert engine.datasets.train.tensors[0].is_cuda is on_device


def flat(record: dict) -> dict:
    """A log record's numbers by key, a list's items under key.i (pytest.approx compares no nested lists)."""
    return {f"{key}.{i}" if isinstance(value, list) else key: item for key, value in record.items()
            for i, item in (enumerate(value) if isinstance(value, list) else [(0, value)])}


@cuda
def test_a_cuda_run_with_true_equals_one_with_false(tmp_path, monkeypatch):
    """The same batches reach the same kernels. cuDNN is held to its deterministic algorithms; what nondeterminism is
    left (atomic additions elsewhere) is what the tolerance allows for. Integer buffers (code counts) are left out:
    one flipped near-tie would move them by a whole count."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    engines = {value: trained(small("cuda", value), tmp_path / str(value)) for value in (True, False)}
    assert engines[True].autoencoder.stream.on_device and not engines[False].autoencoder.stream.on_device
    logs = {value: [flat(record) for record in measured(tmp_path / str(value))] for value in engines}
    assert len(logs[True]) == len(logs[False]) == 6 + 2
    for a, b in zip(logs[True], logs[False]):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)
    states = [torch.load(tmp_path / str(value) / "checkpoint.pt", weights_only=False) for value in engines]
    for level in states[0]["levels"]:
        for name, value in states[0]["levels"][level].items():
            if value.is_floating_point():
                other = states[1]["levels"][level][name]
                assert torch.allclose(value, other, rtol=1e-3, atol=1e-4), f"{level}.{name}"
