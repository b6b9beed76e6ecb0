"""``tracked-ckpt follow RUN -- CMD ARGS...``: run a command for each new checkpoint of a live run.

The command gets the checkpoint's verified local folder and step as placeholders in its arguments
(``{path}``, ``{step}``, ``{ref}``, ``{run_id}``) and as environment variables (``TRACKED_CKPT_PATH``,
``TRACKED_CKPT_STEP``, ``TRACKED_CKPT_REF``, ``TRACKED_CKPT_RUN_ID``). Its output passes through; with
``log_metrics``, lines of the form ``key=value`` (a number) are logged into the training run at the checkpoint's
step (``log_eval``). A command that fails stops the follower with its exit status, before anything is logged for
that checkpoint: a restarted follower (``--resume KEY``) runs it again.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence

from .errors import ConfigError
from .following import FollowedCheckpoint, follow

log = logging.getLogger(__name__)

_METRIC_LINE = re.compile(r"^\s*([A-Za-z0-9_./\- ]*[A-Za-z0-9_./-])\s*=\s*(\S+)\s*$")
PLACEHOLDERS = ("path", "step", "ref", "run_id")


def parse_metrics(output: str) -> dict[str, float]:
    """The ``key=value`` lines of ``output`` whose value is a finite number (the last one of a key wins)."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        m = _METRIC_LINE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(value):
            found[m.group(1).strip()] = value
    return found


def expand(args: Sequence[str], values: dict[str, str]) -> list[str]:
    """``args`` with ``{path}``, ``{step}``, ``{ref}``, ``{run_id}`` filled in (other braces are left alone)."""
    out = []
    for arg in args:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def run_for(ckpt: FollowedCheckpoint, command: Sequence[str], log_metrics: bool) -> int:
    """Run ``command`` for one checkpoint; log its ``key=value`` lines as eval metrics; return its exit status."""
    values = {"path": str(ckpt.local_path), "step": str(ckpt.step), "ref": ckpt.ref, "run_id": ckpt.run_id}
    env = {**os.environ, **{f"TRACKED_CKPT_{k.upper()}": v for k, v in values.items()}}
    argv = expand(command, values)
    log.info("step %d: running %s", ckpt.step, " ".join(argv))
    try:
        p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=False)
    except OSError as e:
        raise ConfigError(f"cannot run {argv[0]!r} for step {ckpt.step}: {e}; check the command after '--'") from e
    sys.stdout.write(p.stdout)
    sys.stdout.flush()
    if p.returncode != 0:
        log.error("step %d: %s exited with status %d; stopping (nothing logged for this step)", ckpt.step, argv[0],
                  p.returncode)  # fmt: skip
        return p.returncode
    if log_metrics:
        metrics = parse_metrics(p.stdout)
        if metrics:
            ckpt.log_eval(metrics)
        else:
            log.warning("step %d: %s printed no key=value line to log", ckpt.step, argv[0])
    return 0


def follow_command(
    run: str,
    command: Sequence[str],
    *,
    latest_only: bool,
    log_metrics: bool,
    resume: str | None,
    until_step: int | None,
    timeout: float | None,
    weights_only: bool,
    cache_dir: str | None,
    tracking_uri: str | None,
) -> int:
    """Follow ``run`` and run ``command`` for each checkpoint; the first failing command's status, else 0."""
    if not command:
        raise ConfigError("no command to run: put it after '--', e.g. tracked-ckpt follow RUN -- python eval.py {path}")
    for ckpt in follow(run, latest_only=latest_only, resume=resume, until_step=until_step, timeout=timeout,
                       weights_only=weights_only, cache_dir=cache_dir, tracking_uri=tracking_uri):  # fmt: skip
        status = run_for(ckpt, command, log_metrics)
        if status != 0:
            return status
    return 0
