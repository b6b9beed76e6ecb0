"""The MLflow UI tells a run's checkpoint story: a real `mlflow server` over the demo's store, a real headless
Chromium (Debian's package, driven by Playwright), the run page's Overview, Model metrics and Artifacts tabs.

Screenshots go to the test's tmp_path; with TRACKED_CKPT_UPDATE_DOCS=1 they are also copied into docs/
(docs/ui-run-page.png, docs/ui-run-artifacts.png), which is how the ones in the docs were made.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from demo_store import DemoServer, demo_server
from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright

from tracked_ckpt.runtags import TAG_BEST, TAG_BEST_STEP, TAG_COUNT, TAG_LATEST, TAG_LATEST_STEP, TAG_MONITOR

pytestmark = [pytest.mark.browser, pytest.mark.server]
CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
LOAD_MS = 90_000  # the first load of a fresh server's UI took up to ~20 s here, more under load


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DemoServer:
    return demo_server(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def page(server: DemoServer) -> Iterator[Any]:
    """A 1920x1200 page on the demo run, switched from the GenAI view to "Model training", Assistant closed."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (tests/run.sh installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1920, "height": 1200})
        page.set_default_timeout(LOAD_MS)
        page.goto(run_url(server))
        page.get_by_text("cartpole-reinforce").first.wait_for()
        toggle = page.get_by_text("Model training", exact=True)
        if toggle.count():  # a fresh browser opens the GenAI view; the choice is kept in localStorage
            toggle.first.click()
        yield page
        browser.close()


def run_url(server: DemoServer) -> str:
    return f"{server.url}/#/experiments/{server.store.experiment_id}/runs/{server.store.run_id}"


def open_run(page: Any, server: DemoServer) -> None:
    page.goto(run_url(server))
    page.get_by_text("Checkpoints (tracked_ckpt)").first.wait_for()
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()  # the "MLflow Assistant" panel opens by itself and covers the tags


def save_shot(page: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), animations="disabled")
    assert shot.stat().st_size > 10_000
    if os.environ.get("TRACKED_CKPT_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, DOCS / name)
    return shot


def visible(page: Any, text: str) -> None:
    """Wait until ``text`` is shown, and check it is not cut off (an ellipsis hides the end of long tags)."""
    el = page.get_by_text(text, exact=True).first
    el.wait_for(state="visible")
    cut = el.evaluate("e => e.scrollWidth > e.clientWidth + 1")
    assert not cut, f"{text!r} is cut off in the UI"


def test_run_overview_shows_the_resume_description_and_the_checkpoint_tags(
    page: Any, server: DemoServer, tmp_path: Path
) -> None:
    open_run(page, server)
    page.get_by_role("button", name="Expand description").click()
    run_id = server.store.run_id
    page.get_by_text(f'run_id="{run_id}"').first.wait_for()  # the resume snippet of mlflow.note.content
    page.get_by_text(f"tracked-ckpt pull {run_id} -o ./ckpt", exact=False).first.wait_for()
    tags = MlflowClient(server.store.uri).get_run(run_id).data.tags
    for key in (TAG_LATEST, TAG_LATEST_STEP, TAG_BEST, TAG_BEST_STEP, TAG_COUNT, TAG_MONITOR):
        visible(page, key)
    body = page.inner_text("body")
    for key in (TAG_LATEST, TAG_BEST, TAG_BEST_STEP, TAG_COUNT):
        assert tags[key] in body, key
    save_shot(page, tmp_path, "ui-run-page.png")


def test_model_metrics_tab_charts_step_epoch_and_reward(page: Any, server: DemoServer, tmp_path: Path) -> None:
    open_run(page, server)
    page.get_by_text("Model metrics", exact=True).first.click()
    for metric in ("step", "epoch", "reward", "loss"):
        page.get_by_text(f"cartpole-reinforce ({metric})").first.wait_for()  # one chart per metric
    save_shot(page, tmp_path, "ui-run-metrics.png")


def test_artifacts_tab_shows_checkpoint_folders_and_their_manifest(
    page: Any, server: DemoServer, tmp_path: Path
) -> None:
    open_run(page, server)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("checkpoints", exact=True).first.click()
    client = MlflowClient(server.store.uri)
    folders = [f.path.rpartition("/")[2] for f in client.list_artifacts(server.store.run_id, "checkpoints")]
    assert folders == ["step-00000005", "step-00000010", "step-00000015"]
    for name in folders:
        page.get_by_text(name, exact=True).first.wait_for()
    best = client.get_run(server.store.run_id).data.tags[TAG_BEST].rpartition("/")[2]
    page.get_by_text(best, exact=True).first.click()
    tree = page.get_by_role("tree") if page.get_by_role("tree").count() else page
    for name in ("state.pt", "rng.json", "MANIFEST.json"):  # a committed checkpoint: data files, then the manifest
        tree.get_by_text(name, exact=True).first.wait_for()
    tree.get_by_text("MANIFEST.json", exact=True).first.click()
    page.get_by_text('"blake3"').first.wait_for()  # the manifest, previewed as text
    page.get_by_text(f'"{server.store.run_id}"').first.wait_for()
    save_shot(page, tmp_path, "ui-run-artifacts.png")
