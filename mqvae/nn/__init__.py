"""Pure torch modules that know no config: the networks, the quantizers, the nearest-code search, k-means and the
PixelCNN. They import nothing of ``mqvae.config``, ``mqvae.io`` or ``mqvae.evaluation`` (tests/test_layout.py); a
module here that takes settings takes them as an object with the config section's fields."""
