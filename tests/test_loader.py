import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from mqvae.errors import UserError
from mqvae.data.loader import BatchStream

N = 23


class Items(Dataset):
    """A non-tensor data set, so the stream must go through DataLoader."""

    def __len__(self):
        return N

    def __getitem__(self, index):
        return torch.full((1, 2, 2), float(index)), index


def tensor_items():
    return TensorDataset(torch.arange(N).float().view(N, 1, 1, 1).expand(N, 1, 2, 2).clone(), torch.arange(N))


DATASETS = {"tensor": tensor_items, "dataloader": Items}


def epoch_ids(stream):
    """Labels of every batch of one epoch (one iter() call), as lists."""
    return [y.tolist() for _, y in stream]


def take(iterator_source, count):
    """``count`` batches' labels, re-calling iter() at epoch ends like Betty does."""
    out, iterator = [], iter(iterator_source)
    while len(out) < count:
        try:
            x, y = next(iterator)
        except StopIteration:
            iterator = iter(iterator_source)
            continue
        # Images carry their own index, so data and labels must stay paired.
        assert torch.equal(x[:, 0, 0, 0].long(), y)
        out.append(y.tolist())
    return out


@pytest.mark.parametrize("kind", DATASETS)
def test_each_index_once_per_epoch_and_epochs_differ(kind):
    stream = BatchStream(DATASETS[kind](), batch_size=5, seed=7, drop_last=False)
    assert len(stream) == 5
    epochs = [epoch_ids(stream) for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(i for b in batches for i in b) == list(range(N))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert stream.state_dict() == {"epoch": 3, "position": 0}


@pytest.mark.parametrize("kind", DATASETS)
def test_same_seed_same_order_other_seed_other_order(kind):
    def run(seed):
        return take(BatchStream(DATASETS[kind](), batch_size=4, seed=seed), 12)

    torch.manual_seed(0)
    first = run(1)
    torch.manual_seed(99)  # the global RNG must not matter
    assert run(1) == first
    assert run(2) != first


def test_order_is_the_documented_function_of_seed_and_epoch():
    stream = BatchStream(tensor_items(), batch_size=N, seed=3)
    for epoch in range(2):
        reference = torch.randperm(N, generator=torch.Generator().manual_seed(3 * 100003 + epoch))
        assert epoch_ids(stream) == [reference.tolist()]


def test_drop_last_and_no_shuffle():
    stream = BatchStream(tensor_items(), batch_size=5, seed=0, shuffle=False)
    assert len(stream) == 4
    assert epoch_ids(stream) == [list(range(i, i + 5)) for i in range(0, 20, 5)]


@pytest.mark.parametrize("kind", DATASETS)
@pytest.mark.parametrize("consumed", [0, 2, 4, 5, 9])  # 4 batches per epoch: mid-epoch, at and past the boundary
def test_resume_continues_the_uninterrupted_stream(kind, consumed):
    def stream():
        return BatchStream(DATASETS[kind](), batch_size=5, seed=11)

    uninterrupted = take(stream(), consumed + 6)
    first = stream()
    assert take(first, consumed) == uninterrupted[:consumed]
    state = first.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    assert take(resumed, 6) == uninterrupted[consumed:]


def test_position_counts_yielded_not_prefetched_batches():
    stream = BatchStream(Items(), batch_size=2, seed=0, num_workers=2)
    iterator = iter(stream)
    next(iterator), next(iterator), next(iterator)  # workers have prefetched further by now
    assert stream.state_dict() == {"epoch": 0, "position": 3}


def test_state_loaded_after_iter_but_before_first_batch_applies():
    reference = BatchStream(tensor_items(), batch_size=5, seed=4)
    expected = take(reference, 3)[2]
    stream = BatchStream(tensor_items(), batch_size=5, seed=4)
    iterator = iter(stream)
    stream.load_state_dict({"epoch": 0, "position": 2})
    assert next(iterator)[1].tolist() == expected


def test_batch_larger_than_data_set_is_user_error():
    with pytest.raises(UserError) as error:
        BatchStream(tensor_items(), batch_size=N + 1, seed=0)
    assert "\n" not in str(error.value) and "batch_size" in str(error.value)
    assert len(BatchStream(tensor_items(), batch_size=N + 1, seed=0, drop_last=False)) == 1


def test_position_beyond_epoch_is_user_error():
    stream = BatchStream(tensor_items(), batch_size=5, seed=0)
    with pytest.raises(UserError, match="position 5"):
        stream.load_state_dict({"epoch": 0, "position": 5})


class Unreadable(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise UserError(f"data.root: 'item{index}.png' is not a readable image")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_user_error_while_reading_stays_one_line(num_workers):
    with pytest.raises(UserError) as error:
        next(iter(BatchStream(Unreadable(), batch_size=2, seed=0, shuffle=False, num_workers=num_workers)))
    assert str(error.value) == "data.root: 'item0.png' is not a readable image"
