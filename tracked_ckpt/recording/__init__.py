"""The recording pipeline every save goes through: plan, local commit, publish, retention, live reads, recovery.

``RunRecorder`` (recorder.py) is the facade; below it, each part knows only the parts under it::

    recorder  ->  writing, publishing, recovery  ->  retention, live  ->  ledger
"""

from __future__ import annotations

from .recorder import RunRecorder
from .writing import fields_of

__all__ = ["RunRecorder", "fields_of"]
