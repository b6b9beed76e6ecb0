"""Named points in the save path where a test harness can kill the process (crash-consistency tests).

``TRACKED_CKPT_FAULT="<stage>[@<n>]"`` makes the process SIGKILL itself the n-th time (default: first) it
reaches ``<stage>``; with a trailing ``!`` (``"<stage>@<n>!"``) it raises ``OSError(EIO)`` there instead, as a
failing disk would. Unset (always, outside tests), a fault point costs one dict lookup.
Stages, in save order: write, fsync, manifest, outbox, rename, upload:<file>, commit_marker, tags,
model_ready, retention, retention_mid, model_delete.
"""

from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def fault_point(stage: str) -> None:
    spec = os.environ.get("TRACKED_CKPT_FAULT")
    if not spec:
        return
    raise_error = spec.endswith("!")
    name, _, nth = spec.rstrip("!").partition("@")
    if name != stage:
        return
    _hits[stage] = _hits.get(stage, 0) + 1
    if _hits[stage] == int(nth or 1):
        if raise_error:
            raise OSError(errno.EIO, f"injected I/O error at {stage}")
        os.kill(os.getpid(), signal.SIGKILL)
