"""The installer argv: keadm's CLI differs across KubeEdge's three eras.

We always run the keadm taken from the *target* image, so the flags follow
the target version. The result is an argv list: no shell ever sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.versions import ImageRef, Version

ERA_B = Version(1, 16, 0, "")  # pre-releases of 1.16 already have `upgrade edge`
ERA_C = Version(1, 21, 0, "")


@dataclass(frozen=True)
class InstallSpec:
    keadm: Path
    from_version: Version
    to_version: Version
    image: ImageRef  # repo only; keadm appends the version
    edgecore_config: Path
    upgrade_id: str
    history_id: str
    image_digest: str | None = None


def era(version: Version) -> str:
    if version < ERA_B:
        return "A"
    if version < ERA_C:
        return "B"
    return "C"


def keadm_argv(spec: InstallSpec) -> list[str]:
    to = str(spec.to_version)
    cfg = str(spec.edgecore_config)
    history = spec.history_id or spec.upgrade_id
    match era(spec.to_version):
        case "A":
            # Era A's edgehub passed the full "<repo>:<version>" reference.
            return [
                str(spec.keadm), "upgrade",
                "--upgradeID", spec.upgrade_id, "--historyID", history,
                "--fromVersion", str(spec.from_version), "--toVersion", to,
                "--config", cfg, "--image", str(spec.image.with_tag(to)),
            ]
        case "B":
            # We back up ourselves, so keadm's second backup (KubeEdge #6211) is off.
            # keadm v1.19/v1.20 pulls --image exactly as given (no tag added), so
            # the reference carries the version, as KubeEdge's own edge code passes it.
            return [
                str(spec.keadm), "upgrade", "edge",
                "--upgradeID", spec.upgrade_id, "--historyID", history,
                "--fromVersion", str(spec.from_version), "--toVersion", to,
                "--config", cfg, "--image", str(spec.image.with_tag(to)), "--disable-backup",
            ]
        case _:
            argv = [
                str(spec.keadm), "upgrade", "edge", "--force",
                "--toVersion", to, "--image", spec.image.repo, "--config", cfg,
            ]
            if spec.image_digest:
                argv += ["--image-digest", spec.image_digest]
            return argv


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
