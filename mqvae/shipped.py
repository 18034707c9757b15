"""Every module that registers a shipped name (data sets, model and quantizer kinds, tasks, the prior's config
check, hypergradient types, optimizers and schedules) into ``mqvae.registry``. Importing it makes those names
known; ``problems`` imports it, so the engines and run.py know them before any config is read."""

import mqvae.data.datasets  # noqa: F401  data.name
import mqvae.method.hypergradients  # noqa: F401  hypergradient.type
import mqvae.method.models  # noqa: F401  model.kind, quantizer.kind, and the tasks
import mqvae.method.optim  # noqa: F401  levels.*.optimizer, levels.*.scheduler
import mqvae.method.prior  # noqa: F401  the prior's task and its prior.run check
