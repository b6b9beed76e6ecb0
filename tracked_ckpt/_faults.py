"""Named points in the save path where a test harness can kill the process (crash-consistency tests).

``TRACKED_CKPT_FAULT="<stage>[@<n>]"`` makes the process SIGKILL itself the n-th time (default: first) it
reaches ``<stage>``. Unset (always, outside tests), a fault point costs one dict lookup.
Stages, in save order: write, fsync, manifest, outbox, rename, upload:<file>, commit_marker, tags,
retention, retention_mid.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(stage: str) -> None:
    spec = os.environ.get("TRACKED_CKPT_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != stage:
        return
    _hits[stage] = _hits.get(stage, 0) + 1
    if _hits[stage] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
