"""The job state machine's vocabulary and its mapping onto KubeEdge's enums.

The journal stores the state a job is *in*; each non-terminal state has one
handler in the runner that does that state's work and names the next state.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    RECEIVED = "received"  # handler: precheck
    PRECHECKED = "prechecked"  # handler: confirmation gate, image pull + keadm extraction
    AWAITING_CONFIRMATION = "awaiting_confirmation"  # parked until `confirm`
    IMAGE_READY = "image_ready"  # handler: backup (into <dir>.partial, then rename)
    BACKED_UP = "backed_up"  # handler: none, moves to installing (committed before keadm)
    INSTALLING = "installing"  # handler: run keadm
    VERIFYING = "verifying"  # handler: health gate
    ROLLING_BACK = "rolling_back"  # handler: restore the backup (idempotent)
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    REJECTED = "rejected"


TERMINAL = frozenset(
    {
        State.SUCCEEDED,
        State.SKIPPED,
        State.FAILED,
        State.ROLLED_BACK,
        State.ROLLBACK_FAILED,
        State.REJECTED,
    }
)
# From these states on the node may be modified, so a failure means rollback.
NODE_TOUCHED = frozenset({State.INSTALLING, State.VERIFYING, State.ROLLING_BACK})

# KubeEdge NodeUpgradeJob v1alpha1 history results (type.go L98-100).
RESULT_SUCCESS = "upgrade_success"
RESULT_ROLLBACK_OK = "upgrade_failed_rollback_success"
RESULT_ROLLBACK_FAILED = "upgrade_failed_rollback_failed"

_RESULTS = {
    State.SUCCEEDED: RESULT_SUCCESS,
    State.SKIPPED: RESULT_SUCCESS,
    State.FAILED: RESULT_ROLLBACK_OK,
    State.ROLLED_BACK: RESULT_ROLLBACK_OK,
    State.REJECTED: RESULT_ROLLBACK_OK,
    State.ROLLBACK_FAILED: RESULT_ROLLBACK_FAILED,
}


def kubeedge_result(state: State) -> str | None:
    return _RESULTS.get(state)


# v1alpha2 action names (types_nodeupgrade.go L155-159).
class Action(str, Enum):
    CHECK = "Check"
    WAITING_CONFIRMATION = "WaitingConfirmation"
    BACKUP = "BackUp"
    UPGRADE = "Upgrade"
    ROLLBACK = "RollBack"


def kubeedge_phase(state: State) -> str:
    """v1alpha2 node phase: Pending | InProgress | Successful | Failure."""
    if state == State.RECEIVED:
        return "Pending"
    if state in (State.SUCCEEDED, State.SKIPPED):
        return "Successful"
    if state in TERMINAL:
        return "Failure"
    return "InProgress"


class Note(str, Enum):
    """Keys of ``Job.notes``: facts a step leaves for later steps, recovery and reports.

    Stored as their string values, so journals written before the enum read back.
    """

    REFUSAL = "refusal"  # why a job failed before touching the node: busy | precheck
    CONFIRMED = "confirmed"  # "yes" once a requireConfirmation job was released
    KEADM = "keadm"  # the staged keadm
    DIGEST = "digest"  # the package image's digest
    EDGECORE_SHA256 = "edgecore_sha256"  # the package's edgecore: what the health gate expects
    VERSION_SOURCE = "version_source"  # which detection source gave fromVersion
    BACKUP = "backup"  # the backup directory of this job
    RESTORE_VERSION = "restore_version"  # a manual rollback's target
    LOG = "log"  # the installer's log file
    INSTALLER = "installer"  # the installer program (recovery kills leftovers of it)
    INSTALL_STARTED = "install_started"  # when it started (whose keadm marker is whose)
    UNIT = "unit"  # what happened to the operator's unit
    IMAGE_SIZE = "image_size"  # a prepull's image size
