#!/usr/bin/env bash
# The test command from the README: installs what the suite needs, then runs it.
#   bash tests/run.sh            # the default suite (~22 minutes on 2 cores, most of it pytest)
#   bash tests/run.sh -k resume  # extra arguments go to pytest
# As root with apt-get, it installs Debian's chromium and postgresql if missing (a few minutes, once).
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
step() { printf '\n==> tests/run.sh [%ss]: %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }

# Debian's chromium drives the MLflow UI browser test (Playwright uses it; no browser download).
# Debian's PostgreSQL backs the team-server tests (tests/test_postgres.py: initdb/pg_ctl in a temp dir).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing Debian packages with apt-get as root: ${missing[*]} (the UI and PostgreSQL tests need them; a few minutes)"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Progress-Fancy=0 "${missing[@]}"
    else
        step "missing Debian packages: ${missing[*]}; install them (apt-get install ${missing[*]}) or their tests fail"
    fi
fi

# torch pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
step "pip: torch==2.13.0 (CPU) and this package with its test extras"
python3 -m pip install --disable-pip-version-check 'torch==2.13.0' -e '.[test]'

step "ruff"
python3 -m ruff check tracked_ckpt tests benchmarks
step "mypy --strict"
python3 -m mypy
step "pytest (real sqlite stores, mlflow server subprocesses, PostgreSQL, a headless browser; ~20 minutes on 2 cores)"
python3 -m pytest "$@"
step "done"
