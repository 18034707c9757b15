"""MQ-VAE toolkit: vector-quantized networks trained by bi-level optimization on Betty."""

from importlib import metadata as _metadata

REQUIRED_BETTY = "0.2.1"


def _check_betty() -> None:
    # Betty 0.2.x declares Python < 3.11, so a plain install on 3.11+ silently falls back to 0.1.1, whose
    # finite difference does not restore the weights and whose roll-back caches state_dict() by reference.
    try:
        found = _metadata.version("betty-ml")
    except _metadata.PackageNotFoundError:
        found = None
    if found != REQUIRED_BETTY:
        have = f"betty-ml {found} is installed" if found else "betty-ml is not installed"
        raise ImportError(f"{have}, but this toolkit needs betty-ml=={REQUIRED_BETTY} (0.1.1 has a finite-difference "
                          f"restore bug and a roll-back caching bug); fix: pip install --ignore-requires-python "
                          f"betty-ml=={REQUIRED_BETTY}")


_check_betty()
