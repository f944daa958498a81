"""Loop configuration: the models of `retention.yaml` and its loader."""

from retention_pipeline.config.loader import ConfigError, load_config, parse_config
from retention_pipeline.config.models import Loop, RetentionConfig, TableMapping

__all__ = ["ConfigError", "Loop", "RetentionConfig", "TableMapping", "load_config", "parse_config"]
