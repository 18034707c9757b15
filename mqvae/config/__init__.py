"""The experiment configuration: the schema (``mqvae.config.schema``: YAML -> typed dataclasses, validated once at
load), the checks that need the model (``mqvae.config.feasibility``) and users' modules (``mqvae.config.plugins``).

The schema's public names are importable from here (``from mqvae.config import spec, load_config``).
"""

from mqvae.config.schema import (
    Config, DataConfig, DistributedConfig, EvalConfig, HypergradientConfig, INT_LIMIT, LevelConfig, LoggingConfig,
    LossConfig, MAX_YAML_VALUES, ModelConfig, PerfConfig, PriorConfig, QuantizerConfig, TrainConfig, build, config_from_dict,
    did_you_mean, load_config, parse_override, parse_yaml, quote, quote_key, read_config, read_yaml, registries,
    spec, to_dict,
)
