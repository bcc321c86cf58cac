"""The one exception tree of edge-upgrade-agent.

Every error the agent raises on purpose derives from :class:`AgentError` and
carries a short, specific ``reason`` that is safe to put into a report (it
never contains credentials). The tree decides what the runner does::

    AgentError
    ├── ConfigError            bad configuration file or option (exit 2)
    │   └── ManifestError      edge-upgrade-ctl: a NodeUpgradeJob it cannot run
    ├── InvalidCommand         malformed, oversized or unauthorised command:
    │                          the job is ``rejected`` and nothing is touched
    ├── Busy                   another job holds the lock, or keadm's own
    │                          idempotency marker is live (exit 4)
    ├── PrecheckFailed         policy or resources refuse the upgrade: the job
    │                          ends ``failed`` before the node is touched (exit 5)
    ├── StepError              a step could not do its work
    │   ├── TransientError     worth retrying with a bounded policy
    │   │                      (registry hiccup, daemon restart, EBUSY)
    │   └── FatalError         retrying cannot help
    │       ├── InstallError   keadm failed or timed out: roll back
    │       ├── HealthCheckFailed  the new edgecore is not healthy: roll back
    │       ├── BackupError    backup missing, incomplete or corrupted
    │       └── RollbackError  the old version could not be restored
    └── JournalError           the state database is unusable (exit 6)
"""

from __future__ import annotations

MAX_REASON = 1024  # a reason goes into reports and log lines: never unbounded
MAX_INPUT_REASON = 240  # one that may quote a sender's input, as KubeEdge's shapes cap it


def cap(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else f"{text[:limit - 30]}... ({len(text)} characters)"


class AgentError(Exception):
    """Base of every deliberate agent error; ``reason`` is report-safe and bounded."""

    exit_code = 1
    max_reason = MAX_REASON

    def __init__(self, reason: str) -> None:
        reason = cap(reason, self.max_reason)
        super().__init__(reason)
        self.reason = reason


class ConfigError(AgentError):
    exit_code = 2


class ManifestError(ConfigError):
    """A NodeUpgradeJob manifest, job name or selection the controller cannot run."""


class InvalidCommand(AgentError):
    exit_code = 2
    max_reason = MAX_INPUT_REASON


class Busy(AgentError):
    exit_code = 4


class PrecheckFailed(AgentError):
    exit_code = 5


class StepError(AgentError):
    pass


class TransientError(StepError):
    pass


class FatalError(StepError):
    pass


class InstallError(FatalError):
    pass


class HealthCheckFailed(FatalError):
    pass


class BackupError(FatalError):
    pass


class RollbackError(FatalError):
    exit_code = 3


class JournalError(AgentError):
    exit_code = 6
