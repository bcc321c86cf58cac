"""The installer argv: keadm's CLI differs across KubeEdge's three eras.

We always run the keadm taken from the *target* image, so the flags follow
the target version. The eras are a table of (first version, argv builder);
a target outside it (before NodeUpgradeJob existed, or a release whose keadm
nobody has checked) has no built-in argv, and the job is refused before the
node is touched rather than sent down the nearest era's flags. A custom
installer (``installers:``) still works there. The result is an argv list:
no shell ever sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import InstallError
from agent.versions import ImageRef, Version


@dataclass(frozen=True)
class InstallSpec:
    keadm: Path
    from_version: Version
    to_version: Version
    image: ImageRef  # repo only; the argv builders add the version where keadm needs it
    edgecore_config: Path
    upgrade_id: str
    history_id: str
    image_digest: str | None = None


def _era_a(spec: InstallSpec) -> list[str]:
    # Era A's edgehub passed the full "<repo>:<version>" reference.
    to = str(spec.to_version)
    return [
        str(spec.keadm), "upgrade",
        "--upgradeID", spec.upgrade_id, "--historyID", spec.history_id or spec.upgrade_id,
        "--fromVersion", str(spec.from_version), "--toVersion", to,
        "--config", str(spec.edgecore_config), "--image", str(spec.image.with_tag(to)),
    ]


def _era_b(spec: InstallSpec) -> list[str]:
    # We back up ourselves, so keadm's second backup (KubeEdge #6211) is off.
    # keadm v1.19/v1.20 pulls --image exactly as given (no tag added), so the
    # reference carries the version, as KubeEdge's own edge code passes it.
    to = str(spec.to_version)
    return [
        str(spec.keadm), "upgrade", "edge",
        "--upgradeID", spec.upgrade_id, "--historyID", spec.history_id or spec.upgrade_id,
        "--fromVersion", str(spec.from_version), "--toVersion", to,
        "--config", str(spec.edgecore_config), "--image", str(spec.image.with_tag(to)),
        "--disable-backup",
    ]


def _era_c(spec: InstallSpec) -> list[str]:
    # keadm >= v1.21 appends ":<toVersion>" itself; --force answers its y/N prompt.
    argv = [
        str(spec.keadm), "upgrade", "edge", "--force",
        "--toVersion", str(spec.to_version), "--image", spec.image.repo,
        "--config", str(spec.edgecore_config),
    ]
    if spec.image_digest:
        argv += ["--image-digest", spec.image_digest]
    return argv


@dataclass(frozen=True)
class Era:
    name: str
    since: Version  # the first version of this era (pre-releases of it included)
    argv: Callable[[InstallSpec], list[str]]


ERAS = (
    Era("A", Version(1, 12, 0, "0"), _era_a),  # NodeUpgradeJob v1alpha1 first shipped in v1.12
    Era("B", Version(1, 16, 0, "0"), _era_b),
    Era("C", Version(1, 21, 0, "0"), _era_c),
)
# The first version whose keadm has not been checked (v1.23.1 is the newest
# that has): its CLI may have moved again.
UNKNOWN_FROM = Version(1, 24, 0, "0")


def era(version: Version) -> Era | None:
    """The era of keadm ``version``, or None if no built-in argv is known for it."""
    if version >= UNKNOWN_FROM:
        return None
    found = [e for e in ERAS if version >= e.since]
    return found[-1] if found else None


def unknown_era(version: Version) -> str:
    return (f"no built-in keadm command line for {version} (known: v1.12 to v1.23); "
            "configure a custom installer (installers:) or update the agent")


def keadm_argv(spec: InstallSpec) -> list[str]:
    found = era(spec.to_version)
    if found is None:
        raise InstallError(unknown_era(spec.to_version))
    return found.argv(spec)


def custom_argv(template: tuple[str, ...], spec: InstallSpec) -> list[str]:
    """Fill a configured installer template (KubeEdge's ``upgradeTool``).

    Values are validated versions, names and paths; each placeholder fills
    whole or part of one argv element and can never split into two.
    """
    values = {
        "keadm": str(spec.keadm),
        "from_version": str(spec.from_version),
        "to_version": str(spec.to_version),
        "image": str(spec.image.with_tag(str(spec.to_version))),
        "repo": spec.image.repo,  # keadm >= v1.21 adds ":<toVersion>" itself
        "config": str(spec.edgecore_config),
        "upgrade_id": spec.upgrade_id,
        "history_id": spec.history_id or spec.upgrade_id,
    }
    out = []
    for arg in template:
        filled = arg
        for name, value in values.items():
            filled = filled.replace("{" + name + "}", value)
        out.append(filled)
    return out
