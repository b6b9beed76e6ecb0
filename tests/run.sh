#!/usr/bin/env bash
# The test command from the README: installs what the suite needs, then runs it.
#   bash tests/run.sh            # the default suite
#   bash tests/run.sh -k resume  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's chromium drives the MLflow UI browser test (Playwright uses it; no browser download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "tests/run.sh: chromium is missing; install Debian's 'chromium' package (the UI test needs it)" >&2
    fi
fi

# Debian's PostgreSQL backs the team-server tests (tests/test_postgres.py: initdb/pg_ctl in a temp dir).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "tests/run.sh: PostgreSQL is missing; install Debian's 'postgresql' package (test_postgres needs it)" >&2
    fi
fi

# torch pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
python3 -m pip install -q --disable-pip-version-check 'torch==2.13.0' -e '.[test]'

python3 -m ruff check tracked_ckpt tests benchmarks
python3 -m mypy
python3 -m pytest "$@"
