"""Preemption: SIGTERM becomes a flag that the training thread acts on at its next ``should_save()``/``save()``.

Saving inside a signal handler could catch the optimizer mid-update, so the handler only records the signal (and
calls a previous Python handler, if any). The manager then saves a final checkpoint, closes (run KILLED) and exits
with status 143, the shell's code for SIGTERM. Under torchrun every rank installs it and the ranks agree (see
distributed.py), since torchrun forwards SIGTERM to each rank at slightly different instants.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)
EXIT_STATUS = 143


class SigtermFlag:
    def __init__(self) -> None:
        self.raised = False
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("save_on_sigterm=True needs the manager to be created in the main thread")
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            log.warning("SIGTERM received: saving a final checkpoint at the next should_save()/save(), then exiting")
            self.raised = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)
        self.installed = True
