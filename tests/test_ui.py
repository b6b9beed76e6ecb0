"""The MLflow UI tells a run's checkpoint story: a real `mlflow server` over the demo's store, a real headless
Chromium (Debian's package, driven by Playwright), the run page's Overview, Model metrics and Artifacts tabs.
Each test is a first visit: a fresh browser profile opens the direct link tracked_ckpt prints and finds its
part of the story without clicking through views or tabs.

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

from tracked_ckpt.runs import KIND_TRAINING, TAG_EXPERIMENT_KIND, ui_link
from tracked_ckpt.runtags import TAG_BEST, TAG_BEST_STEP, TAG_COUNT, TAG_LATEST, TAG_LATEST_STEP, TAG_MONITOR

pytestmark = [pytest.mark.browser, pytest.mark.server]
CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
LOAD_MS = 90_000  # the first load of a fresh server's UI took up to ~20 s here, more under load


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DemoServer:
    return demo_server(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def browser(server: DemoServer) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (tests/run.sh installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield browser
        browser.close()


def first_visit(browser: Any, server: DemoServer, page: str = "") -> Any:
    """A fresh profile (no cookies, no localStorage: the UI's GenAI default) on the link tracked_ckpt prints."""
    context = browser.new_context(viewport={"width": 1920, "height": 1200})
    tab = context.new_page()
    tab.set_default_timeout(LOAD_MS)
    tab.goto(ui_link(server.url, server.store.experiment_id, server.store.run_id, page))
    tab.get_by_text("cartpole-reinforce").first.wait_for()
    # The training view, with no click on the "GenAI | Model training" toggle: its side bar lists runs and models.
    tab.get_by_text("Model registry", exact=True).first.wait_for()
    assert tab.get_by_text("Evaluation runs", exact=True).count() == 0
    return tab


def test_the_demo_prints_the_link_the_browser_opens(server: DemoServer) -> None:
    assert ui_link("http://127.0.0.1:5000", server.store.experiment_id, server.store.run_id) in server.store.stdout
    tags = MlflowClient(server.store.uri).get_experiment(server.store.experiment_id).tags
    assert tags[TAG_EXPERIMENT_KIND] == KIND_TRAINING


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
    browser: Any, server: DemoServer, tmp_path: Path
) -> None:
    page = first_visit(browser, server)
    run_id = server.store.run_id
    page.get_by_text("Checkpoints (tracked_ckpt)").first.wait_for()  # the description, as the page opens
    page.get_by_text("Resume this run").first.wait_for()
    tags = MlflowClient(server.store.uri).get_run(run_id).data.tags
    for key in (TAG_LATEST, TAG_LATEST_STEP, TAG_BEST, TAG_BEST_STEP, TAG_COUNT, TAG_MONITOR):
        visible(page, key)  # the MLflow Assistant panel may stay open: it does not cover the tags at this width
    body = page.inner_text("body")
    for key in (TAG_LATEST, TAG_BEST, TAG_BEST_STEP, TAG_COUNT, TAG_MONITOR):
        assert f"{key}\n: {tags[key]}" in body or f"{key}: {tags[key]}" in body, key
    save_shot(page, tmp_path, "ui-run-page.png")
    page.get_by_role("button", name="Expand description").click()  # the rest of the note: the resume snippet
    page.get_by_text(f'run_id="{run_id}"').first.wait_for()
    page.get_by_text(f"tracked-ckpt pull {run_id} -o ./ckpt", exact=False).first.wait_for()
    page.context.close()


def test_model_metrics_link_charts_step_epoch_and_reward(browser: Any, server: DemoServer, tmp_path: Path) -> None:
    page = first_visit(browser, server, "model-metrics")
    for metric in ("step", "epoch", "reward", "loss"):
        page.get_by_text(f"cartpole-reinforce ({metric})").first.wait_for()  # one chart per metric
    save_shot(page, tmp_path, "ui-run-metrics.png")
    page.context.close()


def test_system_metrics_link_charts_what_each_save_cost(browser: Any, server: DemoServer, tmp_path: Path) -> None:
    page = first_visit(browser, server, "system-metrics")
    for metric in ("checkpoint_blocked_s", "checkpoint_commit_s", "checkpoint_record_s"):
        page.get_by_text(metric).first.wait_for()  # one chart per cost, beside MLflow's own system metrics
    save_shot(page, tmp_path, "ui-run-costs.png")
    page.context.close()


def test_artifacts_link_shows_checkpoint_folders_and_the_best_manifest(
    browser: Any, server: DemoServer, tmp_path: Path
) -> None:
    client = MlflowClient(server.store.uri)
    best = client.get_run(server.store.run_id).data.tags[TAG_BEST]
    page = first_visit(browser, server, f"artifacts/{best}/MANIFEST.json")
    folders = [f.path.rpartition("/")[2] for f in client.list_artifacts(server.store.run_id, "checkpoints")]
    assert folders == ["step-00000005", "step-00000010", "step-00000015"]
    tree = page.get_by_role("tree") if page.get_by_role("tree").count() else page
    for name in ("checkpoints", *folders, "state.pt", "rng.json", "MANIFEST.json"):  # the best one, opened
        tree.get_by_text(name, exact=True).first.wait_for()
    page.get_by_text('"blake3"').first.wait_for()  # the manifest, previewed as text
    page.get_by_text(f'"{server.store.run_id}"').first.wait_for()
    save_shot(page, tmp_path, "ui-run-artifacts.png")
    page.context.close()
