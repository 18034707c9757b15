"""Speed switches of the ``perf`` config section.

- ``perf.channels_last`` (on every device, default on): the encoder's and the decoder's convolution weights
  are stored channels-last (NHWC), so their activations are too. oneDNN runs NHWC convolutions faster: on the
  2-core CPU a digits encoder forward took ~30 % less time and a digits VQ-VAE step 10-20 % less (neutral at
  the paper's shape). cuDNN prefers NHWC as well, above all under bf16 (not measured in this project yet).
  z_e then flattens to N×D vectors without a copy. Values change only by the convolutions' summation order.

The three below act on CUDA only (documented no-ops on the CPU):
- ``perf.cudnn_benchmark``: let cuDNN pick the fastest convolution algorithms for the (fixed) input shapes.
- ``perf.bf16``: the encoder and the decoder run under bf16 autocast and return fp32; the nearest-code
  search scores distances in bf16 and looks the chosen codes up in fp32 (``quantizer.search_precision``,
  Huh et al. 2023 A.1), so the quantizer's losses, the codebook and its gradients stay fp32.
- ``perf.compile``: ``torch.compile`` of the encoder and the decoder, in place (``nn.Module.compile``), so
  parameter names, checkpoints and the in-place parameter edits of the finite-difference passes are unchanged.

On the CPU these three are no-ops: bf16 autocast is slower than fp32 on most CPUs, and compilation there needs
a C++ toolchain and pays off only for long runs. A run with them set on the CPU trains exactly as without.

- ``perf.cuda_graphs`` (CUDA only, refused on the CPU): the iteration captured and replayed (engines.graphs).

Where a switch makes the step slower (measured on an H200, torch 2.11, paper shape, VQ-VAE: bf16 +27 %, compile
+11 %), ``perf_warnings`` says so at the start of a CUDA run. Why bf16 does: the step is launch-bound (about half of
a VQ-VAE iteration's GPU time idle between kernels), and autocast adds a cast kernel per weight and activation that
a convolution reads, 67 more operators per VQ-VAE iteration (205 -> 272) and 170 per MQ-VAE iteration (519 -> 689),
counted by dispatch with CPU autocast standing in (``--operations``' counter); a third more launches cost more than
the bf16 convolutions save at this size. Under ``perf.cuda_graphs`` the launches are replayed from one graph, so the
casts cost their memory traffic alone. Why compile does was not found: ``torch.compile`` of the encoder and the
decoder has no graph break and recompiles once per grad mode only (checked with the aot_eager backend on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

# Labels of the regions ``phase`` marks; ``python -m engines.bench`` reports the time spent in each.
PHASE_PREFIX = "phase:"


def phase(name: str):
    """A region of a training iteration, labelled for ``torch.profiler`` (``PHASE_PREFIX + name``).

    Free when no profiler runs (a check instead of ``record_function``'s ~7 µs enter/exit), so the hot loop
    carries the labels always and ``engines.bench`` (or a user's own profiler session) can say where the time
    goes.
    """
    if not torch._C._autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(PHASE_PREFIX + name)


def perf_quantizer_config(perf, quantizer_cfg, device: torch.device):
    """The quantizer config to build with: bf16 distance scores under ``perf.bf16`` on CUDA."""
    if device.type == "cuda" and perf.bf16 and quantizer_cfg.search_precision == "fp32":
        return dataclasses.replace(quantizer_cfg, search_precision="bf16")
    return quantizer_cfg


def _bf16_forward(forward, cache: bool = True):
    # cache=False under perf.cuda_graphs: autocast's cache of the weights' bf16 copies must not live across a capture
    # (torch.cuda.graph's documentation).
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
            out = forward(*args, **kwargs)
        return out.float()

    return wrapped


def apply_perf(perf, model, device: torch.device) -> dict:
    """Apply the switches to ``model`` (already on ``device``); returns what was applied, by name."""
    applied = {"channels_last": False, "cudnn_benchmark": False, "bf16": False, "compile": False, "cuda_graphs": False}
    parts = [m for m in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if m is not None]
    if perf.channels_last:
        for part in parts:
            part.to(memory_format=torch.channels_last)  # 4-d weights only; in place, parameters keep their identity
        applied["channels_last"] = True
    if device.type != "cuda":
        return applied
    torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    applied["cudnn_benchmark"] = perf.cudnn_benchmark
    applied["cuda_graphs"] = perf.cuda_graphs  # (engines.graphs does the capturing; on the CPU it is refused)
    if perf.bf16:
        for part in parts:
            # An instance attribute: state_dict keys and checkpoints stay as without the switch.
            part.forward = _bf16_forward(part.forward, cache=not perf.cuda_graphs)
        applied["bf16"] = True
    if perf.compile:
        # Compiled backwards "donate" (free early) saved buffers, which forbids retain_graph=True; the upper
        # level differentiates its loss twice (direct term, then v) and the roll-back's kept encoder forward
        # is backpropagated twice, so keep them.
        torch._functorch.config.donated_buffer = False
        for part in parts:
            part.compile()
        applied["compile"] = True
    return applied


def perf_warnings(perf, device: torch.device) -> list[str]:
    """The switches of this run that were measured to make the step slower than fp32 eager (module docstring)."""
    if device.type != "cuda":
        return []
    warnings = []
    if perf.bf16 and not perf.cuda_graphs:
        warnings.append("perf.bf16 without perf.cuda_graphs was measured slower than fp32 at the paper shape (+27 % per "
                        "VQ-VAE step on an H200): its casts add a third more kernel launches to a launch-bound step; "
                        "combine it with perf.cuda_graphs, or compare with python -m engines.bench (its switches part)")
    if perf.compile:
        warnings.append("perf.compile was measured slower than fp32 eager at the paper shape (+11 % per VQ-VAE step on "
                        "an H200); compare with python -m engines.bench (its switches part) before relying on it")
    return warnings
