"""requirements.lock, which the README's install goes through, pins a version of every
dependency pyproject.toml asks for, extras included, and each pin satisfies what is asked."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from retention_pipeline.config.loader import project_root


def _pins() -> dict[str, str]:
    pins = {}
    for line in (project_root() / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"requirements.lock: {line!r} is not a pin"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_the_lock_pins_every_dependency_within_what_pyproject_asks():
    project = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]
    asked = [
        Requirement(line)
        for line in [*project["dependencies"], *project["optional-dependencies"]["demo"]]
        + project["optional-dependencies"]["dev"]
    ]
    pins = _pins()
    for requirement in asked:
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project["name"]):  # an extra naming another extra
            continue
        assert name in pins, f"requirements.lock has no pin for {requirement.name}"
        assert requirement.specifier.contains(pins[name]), (
            f"requirements.lock pins {requirement.name}=={pins[name]}, outside {requirement}: "
            "make the lock again (README, Quick start)"
        )
