"""``python -m tracked_ckpt``: the same command as the ``tracked-ckpt`` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
