"""kmeans_init against float64 references and known ground truth."""

import pytest
import torch

from mqvae.nn.kmeans import kmeans_init

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _quantization_error64(z, codes):
    """Mean float64 squared distance of every input to its nearest code."""
    d = torch.cdist(z.double(), codes.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.min(dim=1).values.square().mean().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 5, 60])
def test_fewer_inputs_than_codes_keeps_codebook_size(device, n):
    z = torch.randn(n, 8, generator=torch.Generator().manual_seed(0)).to(device)
    noise = 1e-3
    codes = kmeans_init(z, 64, generator=_generator(device, 1), noise=noise)

    assert codes.shape == (64, 8) and codes.dtype == z.dtype and codes.device == z.device
    assert torch.isfinite(codes).all()
    # Each code is an input plus N(0, (noise·std)²) per entry: its distance
    # to the nearest input is about noise·std·√8; 10× leaves a wide margin.
    tolerance = 10 * noise * z.std(correction=0).item() * 8**0.5
    code_to_input = torch.cdist(codes.double(), z.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert code_to_input.min(dim=1).values.max().item() < tolerance
    # Every input is used, and repeated draws are separated by the noise.
    assert code_to_input.min(dim=0).values.max().item() < tolerance
    pairwise = torch.cdist(codes.double(), codes.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert pairwise.add(torch.eye(64, device=device)).min().item() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_recovers_well_separated_blob_centres(device):
    g = torch.Generator().manual_seed(2)
    num_blobs, per_blob, dim, spread = 16, 200, 8, 0.1
    centres = torch.randn(num_blobs, dim, generator=g) * 10
    z = (centres.repeat_interleave(per_blob, dim=0) + spread * torch.randn(num_blobs * per_blob, dim, generator=g)).to(device)

    codes = kmeans_init(z, num_blobs, generator=_generator(device, 3)).cpu()

    # Each code must sit on a different true centre. The blob mean deviates
    # from its centre by about spread·√(dim/per_blob) ≈ 0.02.
    distance = torch.cdist(codes.double(), centres.double(), compute_mode="donot_use_mm_for_euclid_dist")
    nearest_centre = distance.argmin(dim=1)
    assert sorted(nearest_centre.tolist()) == list(range(num_blobs)), "two codes share a blob"
    assert distance.min(dim=1).values.max().item() < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_lloyd_iterations_never_increase_quantization_error(device):
    z = torch.randn(3000, 6, generator=torch.Generator().manual_seed(4)).to(device)
    # The same seed gives the same k-means++ seeding, so iters=t is the t-th
    # Lloyd iterate of one run.
    errors = [_quantization_error64(z, kmeans_init(z, 32, iters=t, generator=_generator(device, 5))) for t in range(8)]
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-6), errors
    assert errors[-1] < 0.9 * errors[0], f"Lloyd barely improved on the seeding: {errors}"


@pytest.mark.parametrize("device", DEVICES)
def test_duplicate_points_do_not_crash_seeding(device):
    distinct = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    z = distinct.repeat(40, 1).to(device)  # N = 120 >= num_codes, 3 distinct points

    codes = kmeans_init(z, 5, generator=_generator(device, 6)).cpu()

    assert codes.shape == (5, 2)
    # D² sampling gives already-chosen points zero weight, so the three
    # distinct points are seeded first; the remaining picks fall back to
    # uniform sampling among exact duplicates. Lloyd keeps them all.
    code_set = {tuple(row) for row in codes.tolist()}
    assert code_set == {tuple(row) for row in distinct.tolist()}

    same = torch.zeros(50, 3, device=device) + 2.0
    assert torch.equal(kmeans_init(same, 4, generator=_generator(device, 7)).cpu(), torch.full((4, 3), 2.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [5, 2000])
def test_deterministic_given_generator(device, n):
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(8)).to(device)
    first = kmeans_init(z, 16, generator=_generator(device, 9))
    again = kmeans_init(z, 16, generator=_generator(device, 9))
    other = kmeans_init(z, 16, generator=_generator(device, 10))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_keeps_dtype_and_ignores_autograd():
    z = torch.randn(500, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    z_before = z.detach().clone()
    codes = kmeans_init(z, 8, generator=_generator("cpu", 12))
    assert codes.dtype == torch.float64 and not codes.requires_grad
    assert torch.equal(z.detach(), z_before)

    half_codes = kmeans_init(z.detach().bfloat16(), 8, generator=_generator("cpu", 12))
    assert half_codes.dtype == torch.bfloat16 and torch.isfinite(half_codes.float()).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_codes": 0}, "num_codes"), ({"iters": -1}, "iters"), ({"noise": -1.0}, "noise")],
)
def test_rejects_bad_arguments(kwargs, message):
    arguments = {"num_codes": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        kmeans_init(torch.randn(10, 2), **arguments)
    with pytest.raises(ValueError, match="N×D"):
        kmeans_init(torch.randn(0, 2), 4)


def test_a_new_run_starts_from_kmeans_centres_of_its_encoder_outputs(tmp_path, monkeypatch):
    # Through the command line, as a user starts a run: when training begins, every code that is nearest to some
    # encoder output of the first training images is the mean of those outputs (Lloyd's fixed point, computed
    # here in float64 with a naive search). A codebook the set-up did not fit (random normal codes) is not.
    import copy

    import run
    from engines.engine import LevelEngine

    seen = {}
    original = LevelEngine.run

    def first_look(self):
        seen["model"] = copy.deepcopy(self.model)
        seen["images"] = torch.stack([self.datasets.train[i][0] for i in range(min(2048, len(self.datasets.train)))])
        return original(self)

    monkeypatch.setattr(LevelEngine, "run", first_look)
    args = ["configs/digits/vqvae.yaml", "--set", "model.hidden_channels=8", "--set", "model.res_channels=4",
            "--set", "model.num_res_blocks=1", "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=4",
            "--set", "quantizer.kmeans_iters=200", "--set", "train.iters=1", "--set", "device=cpu",
            "--set", "eval.image_quality=off", "--out", str(tmp_path / "run")]
    assert run.main(args) == 0
    model = seen["model"]
    codes = model.quantizer.codebook.detach().double()
    with torch.no_grad():
        z = model.encoder(seen["images"]).double().movedim(1, -1).reshape(-1, codes.shape[1])
    nearest = ((z[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1)
    used = nearest.unique()
    assert len(used) >= 12  # k-means++ spreads the 16 codes over the data
    for k in used.tolist():
        torch.testing.assert_close(codes[k], z[nearest == k].mean(0), rtol=1e-4, atol=1e-5)


def early_perplexities(tmp_path, name, *extra):
    import json

    import run

    out = tmp_path / name
    assert run.main(["configs/digits/vqvae.yaml", "--set", "train.iters=20", "--set", "train.log_every=1",
                     "--set", "train.eval_every=0", "--set", "device=cpu", "--set", "eval.image_quality=off",
                     *extra, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["vqvae.perplexity"] for r in records if "vqvae.perplexity" in r]


# The stated floor: in the first 20 iterations after the fit, the batch perplexity stays above half of its value at
# the first iteration.
EARLY_FLOOR = 0.5


def test_codes_fitted_after_the_warm_up_stay_in_use_in_the_first_iterations(tmp_path):
    # Without the warm-up the fit is on the untrained encoder, whose outputs the first Adam steps carry away from
    # every code but a few (engines/experiment.py, warm_up_encoder_decoder): the floor would fail there.
    warmed = early_perplexities(tmp_path, "warmed")
    assert len(warmed) == 20 and warmed[0] > 50
    assert min(warmed) >= EARLY_FLOOR * warmed[0], warmed
    cold = early_perplexities(tmp_path, "cold", "--set", "quantizer.kmeans_warmup=0")
    assert min(cold) < 0.2 * cold[0], cold


def test_the_warm_up_trains_the_encoder_decoder_only_and_leaves_the_training_batches_alone(tmp_path):
    from engines.experiment import build_engine, initialize_codebook
    from mqvae.config import load_config

    tiny = ["model.hidden_channels=8", "model.res_channels=4", "model.num_res_blocks=1", "device=cpu"]
    engines = {}
    for steps in (0, 5):
        cfg = load_config("configs/digits/mqvae.yaml", [*tiny, f"quantizer.kmeans_warmup={steps}"])
        engine = engines[steps] = build_engine(cfg, tmp_path / str(steps))
        start = {k: v.clone() for k, v in engine.model.state_dict().items()}
        initialize_codebook(engine)
        moved = {k for k, v in engine.model.state_dict().items() if not torch.equal(v, start[k])}
        assert moved == ({"quantizer.codebook"} if steps == 0 else
                         {k for k in start if k.startswith(("encoder.", "decoder."))} | {"quantizer.codebook"})
        # No gradient is left behind; the training's optimizers hold the warm-up's moments of the encoder and
        # decoder (so that the training does not start with a fresh Adam's large first steps) and nothing else.
        assert all(p.grad is None for p in engine.model.parameters())
        names = {param: name for name, param in engine.model.named_parameters()}
        with_state = {names[p] for problem in engine.problems for p in problem.optimizer.state}
        assert with_state == (set() if steps == 0 else {k for k in moved if k != "quantizer.codebook"})
        engine.train_step()
    first = [engines[s].encoder_level.cur_batch[0] for s in (0, 5)]
    assert torch.equal(*first)
