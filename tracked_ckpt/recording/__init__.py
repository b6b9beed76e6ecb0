"""The recording pipeline every save goes through: plan, local commit, publish, retention, live reads, recovery.

``RunRecorder`` (recorder.py) is the facade; each part below it knows only the parts under it, and they share the
run's bookkeeping through the ledger::

    recorder  ->  writing, publishing, recovery  ->  retention  ->  live  ->  ledger
"""

from __future__ import annotations

from .recorder import RunRecorder

__all__ = ["RunRecorder"]
