"""Nearest-code vector quantization with the straight-through estimator and Huh et al.'s remedies.

One class covers every option of the nearest-code family, because they compose:
- losses (MQ-VAE Eq. 4-6): ``commitment`` d(z_e, sg[z_q]) and ``codebook`` d(sg[z_e], z_q), with d the
  mean squared error over all N·D entries, weighted by ``beta`` and ``codebook_weight``;
- synchronized update ``sync_nu`` (Huh §4.3, Eq. 21), see ``straight_through``;
- affine re-parameterization ``affine`` (Huh §4.1, A.12), see ``affine.py``;
- l2-normalized codes ``l2`` (Yu et al. 2022, as in Huh Table 3): inputs and effective codes are
  l2-normalized, the search uses the cosine distance and the losses and z_q are the normalized vectors;
- grouped latents ``groups`` G: each D-vector is split into G sub-vectors of D/G, and sub-vector g is
  quantized against its own slice of the codebook. The codebook keeps ``num_codes`` codes in total
  (G slices of num_codes/G codes; the reference library's ``GroupVectorQuant(share=False)`` layout),
  so ``num_codes`` means the same thing with and without groups (config key = attribute = length of
  ``counts`` = what evaluation counts), and indices are global: group g's codes are
  [g·K/G, (g+1)·K/G);
- the hyper-net codebook ``codebook_mlp`` (the authors' MQ-GAN code, t2ance/MQVAE ``models_vq.py``,
  ``hyper_net_type: mlp-tanh``): the codes are MLP(codebook), one MLP with tanh between its layers applied to
  every stored vector, which is then the MLP's input embedding rather than a code; see ``raw_codes``;
- maintenance (explicit, ``maintain``): running statistics of the EMA affine map (Huh Eq. 38-41) and
  LRU dead-code replacement (Huh §3, lifespan ``replace_freq``); a training loop that never calls it is told so
  (``UNMAINTAINED_FORWARDS``);
- data-dependent initialization (``initialize``): k-means++ then k-means per latent group (Huh §3.2).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mqvae.errors import UserError, quote
from mqvae.nn.kmeans import kmeans_init
from mqvae.nn.search import nearest_codes
from mqvae.nn.quantizers.affine import LearnedAffine, RunningAffine
from mqvae.nn.quantizers.base import (Quantizer, QuantizerOutput, batch_perplexity, code_counts, from_vectors,
                                      straight_through, to_vectors)

# A replaced code is a batch vector v plus Gaussian noise of std REPLACE_NOISE·‖v‖ (the reference
# library's rho = 0.01), so that codes re-seeded from the same vector differ.
REPLACE_NOISE = 0.01

# Why k-means init and dead-code replacement are not defined with a hyper-net codebook (``codebook_mlp``).
WRITES_CODES = ("writes chosen codes into the codebook, and behind the MLP the codebook holds the MLP's inputs: no input "
                "is known that the MLP maps to a chosen code")

# Training-mode forwards without a ``maintain`` call after which a quantizer whose maintenance is on (EMA affine
# statistics, LRU replacement) warns, once for such a run of forwards: a standalone training loop that forgot the
# call otherwise trains on statistics that never move and dead codes never replaced, and is not told. The engine
# maintains after every iteration, which runs the quantizer 1 to 7 times on the shipped configs (each level's
# forward, Eq. 13's two perturbed passes, a roll-back's real step) and k + 1 times with hypergradient.inner_steps
# k (9 at Table 3's k = 8): 100 is well above that, and a small part of any training run.
UNMAINTAINED_FORWARDS = 100


class VectorQuantizer(Quantizer):
    """Nearest-neighbour quantizer with the straight-through estimator (MQ-VAE Eq. 3-6)."""

    @classmethod
    def check_settings(cls, cfg) -> None:
        if cfg.num_codes % cfg.groups:
            raise UserError(f"quantizer.groups: {cfg.groups} does not divide quantizer.num_codes = {cfg.num_codes} "
                            f"(each latent group gets num_codes/groups codes)")
        for key, unset in (("gumbel_temperature_final", None), ("gumbel_anneal_iters", None),
                           ("gumbel_straight_through", False)):
            value = getattr(cfg, key)
            if value is not unset:
                shown = str(value).lower() if isinstance(value, bool) else value
                raise UserError(f"quantizer.{key}: {shown} applies to quantizer.kind: gumbel only (kind: vq takes "
                                f"the nearest code: no temperature, no sample); remove it")
        for key, value, what, off in (("kmeans_init", cfg.kmeans_init, "k-means init", "false"),
                                      ("replace_freq", cfg.replace_freq, "dead-code replacement", "0")):
            if cfg.codebook_mlp and value:
                raise UserError(f"quantizer.{key}: {str(value).lower()} cannot be combined with quantizer.codebook_mlp: "
                                f"{quote(cfg.codebook_mlp)} ({what} {WRITES_CODES}); set {key}: {off}")
        if cfg.affine == "none":
            if cfg.affine_groups > 1:
                raise UserError(f"quantizer.affine_groups: {cfg.affine_groups} needs quantizer.affine: learned or ema")
            return
        if cfg.num_codes % cfg.affine_groups:
            raise UserError(f"quantizer.affine_groups: {cfg.affine_groups} does not divide quantizer.num_codes = {cfg.num_codes}")
        if cfg.affine == "ema" and cfg.num_codes // cfg.affine_groups < 2:
            raise UserError(f"quantizer.affine_groups: {cfg.affine_groups} leaves one code per group; quantizer.affine: ema "
                            f"needs at least 2 (it divides by the codes' variance)")
        if cfg.affine != "learned" and cfg.affine_lr != 1.0:
            raise UserError(f"quantizer.affine_lr: {cfg.affine_lr} applies to quantizer.affine: learned only "
                            f"(affine: {cfg.affine} has no learned parameters)")

    @classmethod
    def size(cls, cfg) -> tuple[int, int]:
        code_dim = cfg.dim // cfg.groups
        affine = 2 * cfg.affine_groups * code_dim if cfg.affine == "learned" else 0  # s and t
        widths = [code_dim, *cfg.codebook_mlp, code_dim] if cfg.codebook_mlp else []
        mlp = sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(widths, widths[1:]))  # weights and biases
        parameters = cfg.num_codes * code_dim + affine + mlp
        # One int64 per code: its latent group, and with replacement its idle iterations.
        per_code = 8 * (2 if cfg.replace_freq else 1)
        # Running means and variances of z_e and the codes (float32), and a bool.
        running = 4 * 4 * cfg.affine_groups * code_dim + 1 if cfg.affine == "ema" else 0
        return parameters, per_code * cfg.num_codes + running

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_codes = cfg.num_codes
        self.groups = cfg.groups
        self.code_dim = cfg.dim // cfg.groups
        self.codes_per_group = cfg.num_codes // cfg.groups
        codebook = torch.empty(cfg.num_codes, self.code_dim)
        if cfg.codebook_mlp:
            # The MLP's input embedding starts as the authors' nn.Embedding does, N(0, 1): near-equal inputs (the
            # plain codebook's ±1/K) would give near-equal codes. The layers keep nn.Linear's own initialization,
            # which the authors' weights_init leaves alone too (it re-initializes convolutions and BatchNorm only).
            self.codebook = nn.Parameter(codebook.normal_())
            widths = [self.code_dim, *cfg.codebook_mlp, self.code_dim]
            layers = []
            for fan_in, fan_out in zip(widths, widths[1:]):
                layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
            self.codebook_mlp = nn.Sequential(*layers[:-1])  # linear output: the codes are not bounded to (-1, 1)
        else:
            self.codebook = nn.Parameter(codebook.uniform_(-1 / cfg.num_codes, 1 / cfg.num_codes))
            self.codebook_mlp = None
        if cfg.affine == "learned":
            self.affine = LearnedAffine(cfg.num_codes, self.code_dim, cfg.affine_groups, cfg.affine_lr)
        elif cfg.affine == "ema":
            self.affine = RunningAffine(cfg.num_codes, self.code_dim, cfg.affine_groups, cfg.groups, cfg.affine_momentum)
        else:
            self.affine = None
        if cfg.replace_freq:
            # Iterations since each code was last selected (LRU, Huh §3).
            self.register_buffer("idle_iters", torch.zeros(cfg.num_codes, dtype=torch.long))
        # Latent group of each code, for replacement (not state: derived from the config).
        self.register_buffer("code_group", torch.arange(cfg.num_codes) // self.codes_per_group, persistent=False)
        # Training-mode forwards since the last ``maintain`` (UNMAINTAINED_FORWARDS). A plain attribute, not a buffer:
        # it is a usage check, not state, so checkpoints neither hold nor need it.
        self.unmaintained_forwards = 0

    # -- configuration-derived facts -------------------------------------------------------------
    def loss_weights(self) -> dict:
        return {"commitment": self.cfg.beta, "codebook": self.cfg.codebook_weight}

    @property
    def task_reaches_codebook(self) -> bool:
        # Only the synchronized update gives the task loss a path to the codes (and affine parameters).
        return self.cfg.sync_nu > 0

    def param_groups(self) -> list[dict]:
        """Optimizer groups for the level that trains the quantizer, at the quantizer's learning rate: one, the
        codebook, the MLP's weights and biases and the learned affine parameters (``affine_lr`` acts inside the
        affine map, Huh A.1)."""
        return [{"params": list(self.parameters())}]

    # -- the pure part ---------------------------------------------------------------------------
    def raw_codes(self) -> torch.Tensor:
        """The K×(D/G) codes the affine map receives: the codebook, or with ``codebook_mlp`` the MLP's outputs for
        it, row by row (so each latent group's slice of embeddings goes through the one shared MLP)."""
        return self.codebook if self.codebook_mlp is None else self.codebook_mlp(self.codebook)

    def effective_codebook(self) -> torch.Tensor:
        """The K×(D/G) code-vectors the inputs are compared with: the raw codes (the MLP), the affine map, then l2
        normalization."""
        codes = self.raw_codes()
        codes = codes if self.affine is None else self.affine(codes)
        return F.normalize(codes, dim=-1) if self.cfg.l2 else codes

    def _vectors(self, z_e: torch.Tensor) -> torch.Tensor:
        """B×D×H×W -> N×G×(D/G): the sub-vectors the codes are compared with."""
        flat = to_vectors(z_e)
        z = flat.reshape(flat.shape[0], self.groups, self.code_dim)
        return F.normalize(z, dim=-1) if self.cfg.l2 else z

    def _search(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Global index (N, G) of the nearest code of each sub-vector within its group's slice (``z`` and ``codes``
        without their graphs). With one group, the whole codebook and no offset: each slice, offset and stack
        is an operation of its own."""
        z = z.to(codes.dtype)
        metric = "cosine" if self.cfg.l2 else "euclidean"
        indices = []
        for g in range(self.groups):
            start = g * self.codes_per_group
            group = codes if self.groups == 1 else codes[start:start + self.codes_per_group]
            idx, _ = nearest_codes(z[:, g], group, metric=metric, chunk_elements=self.cfg.search_chunk,
                                   precision=self.cfg.search_precision, distances=False)
            indices.append(idx + start if start else idx)
        return torch.stack(indices, dim=1) if self.groups > 1 else indices[0][:, None]

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        self._count_unmaintained_forward()
        z = self._vectors(z_e)
        codes = self.effective_codebook()
        sg_z = z.detach()
        indices = self._search(sg_z, codes.detach())
        # N×G×(D/G), differentiable in the codes (and affine parameters). F.embedding rather than codes[indices]:
        # on CUDA the backward of advanced indexing (index_put with accumulate) is a sort-based kernel that took
        # 65 % of a paper-shape VQ-VAE step on an H100; embedding_dense_backward does the same sum far faster.
        q = F.embedding(indices, codes)
        sg_q = q.detach()
        losses = {
            # Eq. 4: moves the encoder output towards its code.
            "commitment": (z - sg_q).pow(2).mean(),
            # Eq. 5: moves the chosen codes towards the encoder outputs.
            "codebook": (sg_z - q).pow(2).mean(),
        }
        # Eq. 3 (STE), plus Huh Eq. 21 when sync_nu > 0: forward value exactly q.
        z_q = straight_through(z, q, self.cfg.sync_nu, sg_z=sg_z, sg_q=sg_q).reshape(z.shape[0], -1)
        counts = code_counts(indices, self.num_codes)
        return QuantizerOutput(from_vectors(z_q, z_e), indices, losses, batch_perplexity(counts), counts)

    # -- explicit maintenance --------------------------------------------------------------------
    def _count_unmaintained_forward(self) -> None:
        """The forward's one side effect, on a plain attribute (no parameter, no buffer): the count behind the
        UNMAINTAINED_FORWARDS warning. Evaluation forwards need no maintenance and do not count. Under torch.compile
        nothing counts: the graph would read the number as a constant and guard on it, so each new value would
        compile the forward again. (nn.DataParallel counts on its replicas, whose copies are dropped: no warning.)"""
        if not self.training or not self.maintains or torch.compiler.is_compiling():
            return
        self.unmaintained_forwards += 1
        if self.unmaintained_forwards == UNMAINTAINED_FORWARDS:
            warnings.warn(f"VectorQuantizer: {UNMAINTAINED_FORWARDS} training forwards without a maintain() call, "
                          "and its maintenance (EMA affine statistics, dead-code replacement) runs only there: call "
                          "quantizer.maintain(z_e.detach(), out.detached()) after each optimizer step")

    @torch.no_grad()
    def local_statistics(self, z_e: torch.Tensor, out: QuantizerOutput) -> dict:
        """What maintenance needs from this process's batch, as sums (all-reducible)."""
        stats = {"counts": out.counts}
        if isinstance(self.affine, RunningAffine):
            stats.update(self.affine.local_statistics(self._vectors(z_e)))
        return stats

    @torch.no_grad()
    def replacement_candidates(self, z_e: torch.Tensor) -> torch.Tensor:
        """One candidate effective code per code (K×(D/G)): a random sub-vector of the batch from the
        code's own latent group, plus noise (Huh §3). Drawn for every code every time (global RNG), so
        maintenance never waits for the device to learn how many codes are dead."""
        z = self._vectors(z_e).to(self.codebook.dtype)
        pick = torch.randint(z.shape[0], (self.num_codes,), device=z.device)
        v = z[pick, self.code_group]
        noise = torch.randn(v.shape, dtype=v.dtype, device=v.device)
        return v + REPLACE_NOISE * v.norm(dim=-1, keepdim=True) * noise

    @property
    def maintains(self) -> bool:
        return isinstance(self.affine, RunningAffine) or self.cfg.replace_freq > 0

    @torch.no_grad()
    def maintain(self, z_e: torch.Tensor, out: QuantizerOutput) -> None:
        """After a training step: EMA affine statistics (Huh Eq. 38-41), then LRU replacement.

        On the batch it is given, in one process: a data-parallel run gives rank 0 the global batch and
        broadcasts the result (``LevelEngine.maintain``), so the statistics and the replacement candidates are
        those of one process with the global batch.
        """
        self.unmaintained_forwards = 0
        stats = self.local_statistics(z_e, out)
        if isinstance(self.affine, RunningAffine):
            self.affine.update(stats, self.raw_codes())  # the moments of the codes the map receives (Eq. 40-41)
        if self.cfg.replace_freq:
            self.apply_replacement(stats["counts"], self.replacement_candidates(z_e))

    @torch.no_grad()
    def apply_replacement(self, counts: torch.Tensor, candidates: torch.Tensor) -> None:
        """LRU (Huh §3): a code unused for ``replace_freq`` consecutive iterations takes its candidate;
        used codes are left untouched. Candidates are effective codes; the raw code stored is the one
        the current affine map sends there."""
        self._check_codes_writable("apply_replacement")
        idle = torch.where(counts > 0, torch.zeros_like(self.idle_iters), self.idle_iters + 1)
        dead = idle >= self.cfg.replace_freq
        raw = candidates if self.affine is None else self.affine.invert(candidates)
        self.codebook.copy_(torch.where(dead[:, None], raw.to(self.codebook.dtype), self.codebook))
        self.idle_iters.copy_(torch.where(dead, torch.zeros_like(idle), idle))

    def _check_codes_writable(self, method: str) -> None:
        """A quantizer built without ``build_quantizer`` (a standalone loop) skips ``check_settings``: the methods
        that write chosen codes say themselves that an MLP's codes cannot be written."""
        if self.codebook_mlp is not None:
            raise UserError(f"VectorQuantizer.{method}: not defined with quantizer.codebook_mlp: "
                            f"{quote(self.cfg.codebook_mlp)} (it {WRITES_CODES})")

    @torch.no_grad()
    def initialize(self, z_e: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means++ then ``kmeans_iters`` Lloyd steps per latent group (Huh §3.2, A.7), on z_e's device,
        drawing from ``generator`` (the global RNG when None). The codebook keeps its ``num_codes`` codes even with fewer input vectors
        (``kmeans_init`` then re-uses inputs with a little noise). The centres are effective codes; the
        raw codes stored are the ones the current affine map sends there.
        """
        self._check_codes_writable("initialize")
        z = self._vectors(z_e).to(self.codebook.dtype)
        centres = torch.cat([kmeans_init(z[:, g], self.codes_per_group, iters=self.cfg.kmeans_iters,
                                         generator=generator)
                             for g in range(self.groups)])
        self.codebook.copy_(centres if self.affine is None else self.affine.invert(centres))
        if self.cfg.replace_freq:
            self.idle_iters.zero_()
