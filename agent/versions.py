"""KubeEdge version strings, image references and the version policy.

Every string that ends up in an argv, a path or a report is validated here
first: KubeEdge's CVE-2026-62371 came from passing ``spec.version`` and
``spec.image`` into a shell unchecked.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum

from agent.config_reader import show
from agent.errors import InvalidCommand, PrecheckFailed

# ASCII only, everywhere: Python's \d and int() also take full-width and
# Arabic-Indic digits, which would read those spellings of "v1.13.0" as v1.13.0.
VERSION_RE = re.compile(r"^v([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})(?:-([0-9A-Za-z.-]{1,64}))?$",
                        re.ASCII)
# DNS-1123 subdomain, as Kubernetes names NodeUpgradeJobs and nodes.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$",
                     re.ASCII)
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
# Like Docker: the first component is a registry host only if it has a dot or
# a port, or is localhost; anything else is a (lowercase) path component.
_HOST = (rf"(?:{_LABEL}(?:\.{_LABEL})+(?::[0-9]{{1,5}})?|{_LABEL}:[0-9]{{1,5}}"
         r"|localhost(?::[0-9]{1,5})?)")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(
    rf"^(?:(?P<host>{_HOST})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$",
    re.ASCII,
)
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$", re.ASCII)
KUBELET_VERSION_RE = re.compile(
    r"^v[0-9]+\.[0-9]+\.[0-9]+-kubeedge-(v[0-9]+\.[0-9]+\.[0-9]+(?:-[0-9A-Za-z.-]+)?)$", re.ASCII)


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    pre: str = "~"  # "~" marks a release (no pre-release suffix)

    def _key(self) -> tuple[int, int, int, tuple[tuple[int, int, str], ...]]:
        # Semver precedence: a release sorts after its pre-releases; numeric
        # identifiers compare as numbers (rc.10 > rc.2) and before alphanumeric ones.
        # The text breaks a tie (rc.01 against rc.1): two versions that are not equal
        # must not compare as neither less nor greater.
        if self.pre == "~":
            pre: tuple[tuple[int, int, str], ...] = ((2, 0, ""),)
        else:
            pre = tuple((0, int(p), p) if p.isdigit() else (1, 0, p)
                        for p in self.pre.split("."))
        return (self.major, self.minor, self.patch, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    @classmethod
    def parse(cls, text: str) -> Version:
        m = VERSION_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise InvalidCommand(
                f"bad version string {_quote(text)}: expected vMAJOR.MINOR.PATCH[-suffix], "
                "e.g. v1.13.0"
            )
        return cls(int(m[1]), int(m[2]), int(m[3]), m[4] or "~")

    def __str__(self) -> str:
        base = f"v{self.major}.{self.minor}.{self.patch}"
        return base if self.pre == "~" else f"{base}-{self.pre}"


def _quote(value: object, limit: int = 80) -> str:
    """Quote a rejected value for a reason, cut so a hostile value cannot bloat reports
    (a bounded repr: a YAML alias bomb's whole repr would take minutes)."""
    text = repr(value) if isinstance(value, str) else show(value)
    return text if len(text) <= limit else text[:limit] + "…"


def version_from_kubelet(kubelet_version: str) -> Version | None:
    """``v1.22.17-kubeedge-v1.12.1`` → ``v1.12.1`` (the suffix keadm reads).

    None as well when the suffix is no version the agent takes (say ``v99999.0.0``):
    this is detection, so an odd answer means "not known here", never an error.
    """
    m = KUBELET_VERSION_RE.fullmatch(kubelet_version.strip())
    if m is None:
        return None
    try:
        return Version.parse(m[1])
    except InvalidCommand:
        return None


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > 253 or not NAME_RE.fullmatch(value):
        raise InvalidCommand(f"bad {kind} {_quote(value)}: expected a lowercase DNS-1123 name")
    return value


@dataclass(frozen=True)
class ImageRef:
    """A validated image reference; ``repo`` includes the registry host if any."""

    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        first = self.repo.split("/", 1)[0]
        if "/" in self.repo and ("." in first or ":" in first or first == "localhost"):
            return first
        return "docker.io"

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef(self.repo, tag, self.digest)

    def __str__(self) -> str:
        text = self.repo
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image(text: str) -> ImageRef:
    if not isinstance(text, str) or len(text) > 512 or not (m := IMAGE_RE.fullmatch(text)):
        raise InvalidCommand(
            f"bad image reference {_quote(text)}: expected [registry[:port]/]path[:tag][@sha256:…]"
        )
    repo = f"{m['host']}/{m['path']}" if m["host"] else m["path"]
    return ImageRef(repo, m["tag"], m["digest"])


def check_digest(text: str) -> str:
    if not isinstance(text, str) or not DIGEST_RE.fullmatch(text):
        raise InvalidCommand(f"bad image digest {_quote(text)}: expected sha256:<64 hex>")
    return text


class Decision(str, Enum):
    UPGRADE = "upgrade"
    SKIP = "skip"


@dataclass(frozen=True)
class VersionPolicy:
    allow_downgrade: bool = False
    max_minor_skip: int | None = None

    def decide(self, current: Version, target: Version) -> Decision:
        """Upgrade, skip (already there), or raise PrecheckFailed with the reason."""
        if current == target:
            return Decision.SKIP
        if target < current and not self.allow_downgrade:
            raise PrecheckFailed(
                f"refusing downgrade from {current} to {target} (policy.allow_downgrade is off)"
            )
        if self.max_minor_skip is not None and target > current:
            skip = (target.major - current.major) * 1000 + target.minor - current.minor
            if target.major != current.major or skip > self.max_minor_skip:
                raise PrecheckFailed(
                    f"refusing to skip from {current} to {target}: more than "
                    f"{self.max_minor_skip} minor version(s) (policy.max_minor_skip)"
                )
        return Decision.UPGRADE
