"""Load `retention.yaml`: environment references, then validation, then one-line errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from retention_pipeline.config.models import RetentionConfig

CONFIG_ENV_VAR = "RETENTION_CONFIG"
DATABASE_URL_ENV_VAR = "RETENTION_DATABASE_URL"
DEFAULT_CONFIG_NAME = "retention.yaml"
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key path."""


class _Loader(yaml.SafeLoader):
    """YAML as 1.2 reads booleans: only true and false. YAML 1.1 also reads yes, no, on and off
    as booleans, so `in: [ON_HOLD, OFF]` would compare a status with 'false', and match nobody."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


# The checkout this code runs from, when it runs from one (an editable install, the tests).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def project_root() -> Path:
    """Where `retention.yaml`, `workspace.yaml` and `.retention` are looked for: the source
    checkout this code runs from, or, installed as a package (`pip install .` puts it in
    site-packages), the folder the command starts in (Dagster's code servers start in the
    folder the webserver or daemon started in)."""
    if (SOURCE_ROOT / "pyproject.toml").is_file():
        return SOURCE_ROOT
    return Path.cwd()


def default_config_path() -> Path:
    explicit = os.environ.get(CONFIG_ENV_VAR)
    if explicit:
        return Path(explicit)
    return project_root() / DEFAULT_CONFIG_NAME


def _expand(value: Any, path: str, environ: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            key: _expand(item, f"{path}.{key}" if path else str(key), environ)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_expand(item, f"{path}.{index}", environ) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable {name} is not set")

    return ENV_REFERENCE.sub(substitute, value)


# (union field, tag) pairs whose tag pydantic inserts into an error's location.
DISCRIMINATOR_TAGS = {
    *(("condition", tag) for tag in ("segment", "query")),
    *(("success", tag) for tag in ("activity", "events", "query")),
    *(("action", tag) for tag in ("column", "constant")),
    *(("amount", tag) for tag in ("stored", "none")),
}


def _format_location(location: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator's tag after a union field: `condition.query.timeout`
    parts: list[str] = []
    for index, part in enumerate(location):
        if index and (location[index - 1], part) in DISCRIMINATOR_TAGS:
            continue
        parts.append(str(part))
    return ".".join(parts)


def parse_config(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: str = "configuration"
) -> RetentionConfig:
    """Validate a parsed YAML document; raise ConfigError with one line on the first problem."""
    environ = os.environ if environ is None else environ
    try:
        expanded = _expand(dict(raw), "", environ)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        return RetentionConfig.model_validate(expanded)
    except ValidationError as error:
        first = error.errors()[0]
        location = _format_location(first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {location}: {message}") from None


def load_config(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> RetentionConfig:
    """Read and validate the loop configuration (default: $RETENTION_CONFIG or ./retention.yaml)."""
    path = Path(path) if path else default_config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration: {error.strerror}") from None
    try:
        document = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    except ValueError as error:  # a scalar YAML cannot build, like the date 2026-02-30
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(document, environ, source=str(path))
