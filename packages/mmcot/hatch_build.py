"""Build hook: this package's ``mmr-core`` requirement, a version range from the one version number.

The five mmr distributions share one version, ``shared/src/mmr_core/_version.py`` (read by
``[tool.hatch.version]``). A wheel must name mmr-core as a version range a package index can resolve, never
a path into this checkout, so this hook adds ``mmr-core>=X.Y.Z,<X.(Y+1)`` to the requirements listed under
``[tool.hatch.metadata.hooks.custom]``: below 1.0 a minor release may break the packages built on the core.

A wheel built from the sdist reads version and requirements from the sdist's PKG-INFO (hatchling does that
for fields listed as dynamic), so the version file outside this folder is only read from the checkout.
The four packages hold byte-identical copies of this file (``tests/test_wheels.py`` checks).
"""

from __future__ import annotations

from typing import Any

from hatchling.metadata.plugin.interface import MetadataHookInterface
from packaging.version import Version


def mmr_core_requirement(version: str) -> str:
    """The requirement on mmr-core that a package at ``version`` declares.

    Args:
        version: The package's version (the shared one), e.g. ``"0.1.0"``.

    Returns:
        ``"mmr-core>=0.1.0,<0.2"`` for ``"0.1.0"``; ``"mmr-core>=1.2.0,<2"`` from 1.0 on (semantic versioning).
    """
    parsed = Version(version)
    upper = f"{parsed.major}.{parsed.minor + 1}" if parsed.major == 0 else f"{parsed.major + 1}"
    return f"mmr-core>={parsed.base_version},<{upper}"


class MmrCoreRequirementHook(MetadataHookInterface):
    """Sets ``dependencies``: mmr-core as a range around this build's version, then the hook's own list."""

    PLUGIN_NAME = "custom"

    def update(self, metadata: dict[str, Any]) -> None:
        """Fill ``metadata["dependencies"]`` (hatchling calls this with the version already set).

        Args:
            metadata: The ``[project]`` table being built; ``version`` is set from ``[tool.hatch.version]``.
        """
        third_party = list(self.config.get("dependencies", []))
        metadata["dependencies"] = [mmr_core_requirement(metadata["version"]), *third_party]
