"""Quantizer from config, with the checks that span several quantizer keys."""

from __future__ import annotations

from ..config import QuantizerConfig
from ..errors import UserError
from .base import Quantizer
from .gumbel import GumbelQuantizer
from .vq import VectorQuantizer


def check_quantizer_config(cfg: QuantizerConfig) -> None:
    """Reject combinations that have no meaning, with one line naming the keys."""
    if cfg.kind == "gumbel":
        # Gumbel-VQ predicts the code from logits: there is no nearest-code search, no straight-through
        # estimator and no commitment/codebook loss for these options to act on.
        for key, unused in (("affine", cfg.affine != "none"), ("sync_nu", cfg.sync_nu > 0),
                            ("replace_freq", cfg.replace_freq > 0), ("kmeans_init", cfg.kmeans_init),
                            ("l2", cfg.l2), ("groups", cfg.groups > 1)):
            if unused:
                raise UserError(f"quantizer.{key}: {getattr(cfg, key)!r} cannot be combined with quantizer.kind: gumbel "
                                f"(it applies to nearest-code quantizers only; use kind: vq)")
        return
    if cfg.num_codes % cfg.groups:
        raise UserError(f"quantizer.groups: {cfg.groups} does not divide quantizer.num_codes = {cfg.num_codes} "
                        f"(each latent group gets num_codes/groups codes)")
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


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    check_quantizer_config(cfg)
    if cfg.kind == "gumbel":
        return GumbelQuantizer(cfg)
    return VectorQuantizer(cfg)
