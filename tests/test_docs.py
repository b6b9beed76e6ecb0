"""The README and every page of docs/ run as printed: each page's code blocks, in order, in a fresh folder.

A page runs top to bottom in its own temporary working directory with its own sqlite store (MLflow's local default,
``./mlflow.db``; no ``MLFLOW_TRACKING_URI``), as a user copying it would. ``python`` blocks run as scripts;
``bash``/``sh`` blocks and the ``$ `` lines of ``console`` blocks run in bash (a ``cd`` carries over to the next block;
a ``console`` command whose printed output shows an error must fail, any other must succeed). In shell commands,
``RUN_ID`` (and the IDs printed as examples, ``3f2a...`` or 32 hex digits) stand for the run the page's latest
example announced (``new run ID``, ``run_id ID``: the ID its text tells the reader to use).

An HTML comment right above a block (invisible on GitHub) tells this test what the block is:

- ``<!-- docs-test: file NAME -->``: save the block as ``NAME`` (a script the next blocks run);
- ``<!-- docs-test: resumes -->``: the block resumes the page's run: afterwards the store has no new run and the run's
  latest checkpoint is at a later step (it trained further);
- ``<!-- docs-test: skip REASON -->``: not run (it needs a server, credentials or an install, or it is an excerpt
  of a page that runs in full); each is reported as a skipped case ``test_block_not_run[...]`` with its reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
# Pages whose examples take minutes on 2 cores: they run with --run-slow only.
SLOW = {
    "docs/lifecycle.md": "ten commands and scripts after a demo (~2 min on 2 cores)",
    "docs/usage.md": "every CLI command of the page, two demos (~4 min on 2 cores)",
    "docs/distributed.md": "four torchrun launches of the FSDP2 demo (~2 min on 2 cores)",
    "docs/huggingface.md": "two Trainer runs of a GPT-2 (~1 min on 2 cores)",
}
RUNNABLE = {"python", "bash", "sh", "console"}
DISPLAY = {"", "text", "json", "ini", "toml", "yaml"}  # layouts, outputs, grammars: nothing to run
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
# How the examples announce their run ("new run ID", "run_id ID", "run ID: ..."); a fork's announcement is not it.
ANNOUNCED = re.compile(r"^(?:new run|run_id|run) ([0-9a-f]{32})\b(?!, forked)", re.M)
PLACEHOLDER = re.compile(r"\bRUN_ID\b|\b[0-9a-f]{32}\b|\b[0-9a-f]{4}\.\.\.")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    mark: str = ""  # file, resumes, skip or ""
    arg: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The code blocks of a page that are programs (python, shell), with the docs-test mark right above each."""
    text = (ROOT / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) not in RUNNABLE:
            continue  # a layout, a reference grammar, a table of output: nothing to run
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        line = text.count("\n", 0, m.start()) + 1
        kind, arg = (mark.group(1), mark.group(2)) if mark else ("", "")
        assert kind in ("", "file", "resumes", "skip"), f"{page}:{line}: unknown docs-test mark {kind!r}"
        found.append(Block(page, line, m.group(1), m.group(2), kind, arg))
    return found


def not_run() -> list[object]:
    return [
        pytest.param(b, id=f"{b.id} {b.arg}", marks=pytest.mark.skip(reason=f"{b.id}: {b.arg}"))
        for page in PAGES
        for b in blocks(page)
        if b.mark == "skip"
    ]


def page_params() -> list[object]:
    return [pytest.param(p, id=p, marks=[pytest.mark.slow] if p in SLOW else []) for p in PAGES]


def test_every_page_has_its_programs_run_or_marked() -> None:
    """Every page is here, every block is a program or a display, and every skip says why (the skipped blocks are
    listed by test_block_not_run)."""
    assert "docs/lifecycle.md" in PAGES and "docs/usage.md" in PAGES
    for page in PAGES:
        langs = {m.group(1) for m in FENCE.finditer((ROOT / page).read_text())}
        assert langs <= RUNNABLE | DISPLAY, f"{page}: {langs - RUNNABLE - DISPLAY} blocks: run them or add to DISPLAY"
        for b in blocks(page):
            assert b.mark != "skip" or len(b.arg) > 10, f"{b.id}: a skip needs its reason"
            assert b.mark != "file" or b.lang == "python", f"{b.id}: only python blocks are saved as files"


@pytest.mark.parametrize("block", not_run())
def test_block_not_run(block: Block) -> None:
    raise AssertionError("never runs: each case is skipped, with its reason, so that the listing shows")


# ------------------------------------------------------------------------------------------------- a page


class Page:
    """A page being run: its folder, its environment, what it printed, and its store."""

    def __init__(self, page: str, root: Path) -> None:
        self.page, self.root, self.cwd, self.output = page, root, root, ""
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the user's defaults
        self.env["PYTHONPATH"] = str(ROOT)  # this checkout's tracked_ckpt, also in subprocesses
        self.env["OMP_NUM_THREADS"] = "1"
        (root / ".docs-test").mkdir()

    @property
    def run_id(self) -> str | None:
        found = ANNOUNCED.findall(self.output)
        return found[-1] if found else None

    def substitute(self, command: str) -> str:
        run_id = self.run_id
        return PLACEHOLDER.sub(run_id, command) if run_id else command

    def run(self, block: Block) -> None:
        if block.mark == "file":
            (self.cwd / block.arg).write_text(block.code)
            return
        script = self.root / ".docs-test" / f"block-{block.line}"
        if block.lang == "python":
            script.write_text(block.code)
            argv = [sys.executable, str(script)]
        else:
            script.write_text(shell_script(block, self.substitute, self.root / ".docs-test" / "cwd"))
            argv = ["bash", str(script)]
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=300)
        said = f"{block.id} ({time.perf_counter() - t0:.1f} s) exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        print(said[:2000])
        assert p.returncode == 0, said
        self.output += p.stdout + p.stderr
        if block.lang != "python":
            self.cwd = Path((self.root / ".docs-test" / "cwd").read_text().strip())

    def store(self) -> dict[str, int]:
        """Every run of the store in the current folder, with its latest checkpoint's step (-1: none)."""
        from mlflow.tracking import MlflowClient

        from tracked_ckpt.runtags import TAG_LATEST_STEP

        db = self.cwd / "mlflow.db"  # MLflow's default store, where the page's commands run
        if not db.exists():
            return {}
        client = MlflowClient(f"sqlite:///{db}")
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, max_results=1000)
        return {r.info.run_id: int(r.data.tags.get(TAG_LATEST_STEP, -1)) for r in runs}


def shell_script(block: Block, substitute: object, cwd_file: Path) -> str:
    """Bash for a shell block: every command checked (console: one whose shown output is an error must fail)."""
    assert callable(substitute)
    lines = [f"trap 'pwd > {cwd_file}' EXIT"]
    if block.lang != "console":
        return "\n".join([*lines, "set -euo pipefail", substitute(block.code)])
    text = block.code.split("\n")
    for i, line in enumerate(text):
        if not line.startswith("$ "):
            continue
        shown = []
        for out in text[i + 1 :]:
            if out.startswith("$ "):
                break
            shown.append(out)
        fails = any("error:" in s for s in shown)
        check = "-ne 0" if fails else "-eq 0"
        cmd = substitute(line[2:])
        lines += [
            cmd,
            "__rc=$?",
            f"[ $__rc {check} ] || {{ echo 'docs-test: exit '$__rc' from: {cmd.replace(chr(39), '')}' >&2; exit 99; }}",
            "(exit $__rc)",
        ]
    return "\n".join([*lines, "exit 0"])


@pytest.mark.parametrize("page", page_params())
def test_page_runs_as_printed(page: str, tmp_path: Path) -> None:
    run = Page(page, tmp_path)
    ran = 0
    for block in blocks(page):
        if block.mark == "skip":
            continue
        before = run.store()
        run.run(block)
        ran += block.mark != "file"
        if block.mark == "resumes":
            after = run.store()
            run_id = run.run_id or next(iter(before), None)
            assert run_id in before, f"{block.id}: no run to resume before it ({before})"
            assert after.keys() == before.keys(), f"{block.id}: the resume made a new run: {before} -> {after}"
            assert after[run_id] > before[run_id], f"{block.id}: the resumed run trained no further: {before[run_id]}"
    if not ran:
        pytest.skip(f"{page} has no code block to run")
