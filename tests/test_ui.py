"""The MLflow UI tells a run's checkpoint story: a real `mlflow server` over the demo's store, a real headless
Chromium (Debian's package, driven by Playwright), the run page's Overview, Model metrics and Artifacts tabs.
Each test is a first visit: a fresh browser profile opens the direct link tracked_ckpt prints and finds its
part of the story without clicking through views or tabs.

Screenshots go to the test's tmp_path; with TRACKED_CKPT_UPDATE_DOCS=1 they are also copied into docs/
(docs/ui-run-page.png, docs/ui-run-artifacts.png), which is how the ones in the docs were made.

The checkpoint's life after training (docs/lifecycle.md): a fork of the demo run (`demo --fork-from`) shows its
parent on its page and a reward chart that continues the parent's; a promoted checkpoint shows on the Models
pages with its source run (docs/ui-fork-page.png, docs/ui-fork-metrics.png, docs/ui-model-version.png).

Every kept checkpoint is a LoggedModel (models.py): the experiment's Models tab lists them with their metrics and
source run, the run page's "Logged models" table with their steps (docs/ui-experiment-models.png,
docs/ui-run-models.png).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from demo_store import DemoServer, demo_server
from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright

from tracked_ckpt.lifecycle import MODEL_TAG_CHECKPOINT
from tracked_ckpt.runs import KIND_TRAINING, TAG_EXPERIMENT_KIND, ui_link
from tracked_ckpt.runtags import (
    TAG_BEST,
    TAG_BEST_STEP,
    TAG_COUNT,
    TAG_FORKED_FROM,
    TAG_LATEST,
    TAG_LATEST_STEP,
    TAG_MONITOR,
    TAG_PARENT_RUN,
    TAG_PARENT_STEP,
)

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


def first_visit(browser: Any, server: DemoServer, page: str = "", run: tuple[str, str] | None = None) -> Any:
    """A fresh profile (no cookies, no localStorage: the UI's GenAI default) on the link tracked_ckpt prints."""
    context = browser.new_context(viewport={"width": 1920, "height": 1200})
    tab = context.new_page()
    tab.set_default_timeout(LOAD_MS)
    experiment_id, run_id = run or (server.store.experiment_id, server.store.run_id)
    tab.goto(ui_link(server.url, experiment_id, run_id, page))
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


def test_an_evaluators_scores_chart_on_the_training_run(browser: Any, server: DemoServer, tmp_path: Path) -> None:
    """log_eval from a follower: the score is a chart of the training run, at the checkpoints' steps."""
    import tracked_ckpt

    steps = []
    for ckpt in tracked_ckpt.follow(server.store.run_id, tracking_uri=server.store.uri):
        ckpt.log_eval({"eval/score": float(ckpt.step)})
        steps.append(ckpt.step)
    history = MlflowClient(server.store.uri).get_metric_history(server.store.run_id, "eval/score")
    assert steps and sorted(m.step for m in history) == steps
    page = first_visit(browser, server, "model-metrics")
    page.get_by_text("cartpole-reinforce (eval/score)").first.wait_for()  # its chart, beside reward's
    page.get_by_text("cartpole-reinforce (reward)").first.wait_for()
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


# ------------------------------------------------------------------------------- after training: fork, promote


@pytest.fixture(scope="module")
def lineage(server: DemoServer) -> tuple[str, str, Any]:
    """(fork's experiment ID, fork's run ID, the version promoted from the best checkpoint) on the demo's store."""
    store = server.store
    cmd = [sys.executable, "-m", "tracked_ckpt", "demo", "--fork-from", f"{store.run_id}@10", "--iterations", "5",
           "--save-dir", "ui_fork_checkpoints", "--experiment", "tracked-ckpt-demo-ui-forks"]  # fmt: skip
    p = subprocess.run(cmd, cwd=store.root, env=store.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    fork_id = re.search(r"new run ([0-9a-f]{32}), forked from", p.stdout).group(1)  # type: ignore[union-attr]
    client = MlflowClient(store.uri)
    cmd = [sys.executable, "-m", "tracked_ckpt", "promote", f"{store.run_id}@best", "--name", "cartpole-demo",
           "--alias", "prod"]  # fmt: skip
    p = subprocess.run(cmd, cwd=store.root, env=store.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "as 'cartpole-demo' version 1, alias 'prod'" in p.stdout, p.stdout + p.stderr
    return client.get_run(fork_id).info.experiment_id, fork_id, client.get_model_version("cartpole-demo", "1")


def test_a_forks_page_names_its_parent_and_its_reward_chart_continues_the_parents(
    browser: Any, server: DemoServer, lineage: tuple[str, str, Any], tmp_path: Path
) -> None:
    exp_id, fork_id, _ = lineage
    client = MlflowClient(server.store.uri)
    parent = {m.step: m.value for m in client.get_metric_history(server.store.run_id, "reward")}
    fork = {m.step: m.value for m in client.get_metric_history(fork_id, "reward")}
    assert {s: v for s, v in fork.items() if s <= 10} == {s: v for s, v in parent.items() if s <= 10}
    assert max(fork) == 15 and sorted(fork) == [5, 10, 15]  # the parent's 5 and 10, then the fork's own 15
    page = first_visit(browser, server, run=(exp_id, fork_id))
    page.get_by_text("Forked from").first.wait_for()
    page.get_by_text(server.store.run_id).first.wait_for()  # the parent's run ID, in the description
    visible(page, TAG_PARENT_STEP)
    body = page.inner_text("body")
    for key in (TAG_FORKED_FROM, TAG_PARENT_RUN):  # shown, though the long runs:/ value may cut the key's cell
        assert key in body or key[:20] in body, key
    save_shot(page, tmp_path, "ui-fork-page.png")
    page.context.close()
    page = first_visit(browser, server, "model-metrics", run=(exp_id, fork_id))
    page.get_by_text("cartpole-reinforce (reward)").first.wait_for()
    save_shot(page, tmp_path, "ui-fork-metrics.png")
    page.context.close()


def test_the_models_tab_and_the_run_page_list_each_checkpoint_as_a_logged_model(
    browser: Any, server: DemoServer, lineage: tuple[str, str, Any], tmp_path: Path
) -> None:
    client = MlflowClient(server.store.uri)
    store = server.store
    models = client.search_logged_models([store.experiment_id], filter_string=f"source_run_id = '{store.run_id}'",
                                         order_by=[{"field_name": "metrics.reward", "ascending": False}])  # fmt: skip
    rewards = {lm.name: next(m.value for m in lm.metrics if m.key == "reward") for lm in models}
    assert sorted(rewards) == ["step-00000005", "step-00000010", "step-00000015"]
    assert list(rewards.values()) == sorted(rewards.values(), reverse=True)  # MLflow's own "best first"
    promoted_model = lineage[2].source.removeprefix("models:/")
    assert client.get_logged_model(promoted_model).name in rewards  # promote registered one of them
    page = first_visit(browser, server, run=(store.experiment_id, store.run_id))
    page.goto(f"{server.url}/#/experiments/{store.experiment_id}/models?workflowType=machine_learning")
    for name in rewards:
        page.get_by_text(name, exact=True).first.wait_for()
    close = page.get_by_role("button", name="Close")  # the MLflow Assistant panel hides the metric columns
    if close.count():
        close.first.click()
    page.get_by_role("columnheader", name="reward").first.wait_for()
    body = page.inner_text("body")
    for name, reward in rewards.items():  # each checkpoint and its reward, as the table prints it
        assert name in body and f"\n{reward!r}\n" in body, (name, reward, body[:3000])
    assert body.count("cartpole-reinforce") >= 3 and "cartpole-demo" in body  # source runs; the registered one
    save_shot(page, tmp_path, "ui-experiment-models.png")
    page.goto(ui_link(server.url, store.experiment_id, store.run_id))
    page.get_by_text(f"Logged models ({len(rewards)})").first.wait_for()
    steps = {int(row.rsplit("step-", 1)[1]) for row in rewards}
    page.get_by_text("Output", exact=True).last.scroll_into_view_if_needed()  # the table's last row, in view
    text = page.inner_text("body")
    for step in steps:  # each one's step, as the run's output
        assert re.search(rf"Output\n{step}\n.*?step-{step:08d}", text, re.S), (step, text[-3000:])
    save_shot(page, tmp_path, "ui-run-models.png")
    page.context.close()


def test_a_promoted_checkpoint_shows_on_the_models_pages_with_its_source_run(
    browser: Any, server: DemoServer, lineage: tuple[str, str, Any], tmp_path: Path
) -> None:
    _, _, promoted = lineage
    assert promoted.source.startswith("models:/m-")  # linked to its LoggedModel: the checkpoint's own
    lm = MlflowClient(server.store.uri).get_logged_model(promoted.source.removeprefix("models:/"))
    versions = '[{"name": "cartpole-demo", "version": "1"}]'  # the Models tab's "Registered models" column
    assert lm.name.startswith("step-") and lm.tags["mlflow.modelVersions"] == versions
    assert promoted.tags[MODEL_TAG_CHECKPOINT].startswith(f"runs:/{server.store.run_id}/checkpoints/")
    context = browser.new_context(viewport={"width": 1920, "height": 1200})
    page = context.new_page()
    page.set_default_timeout(LOAD_MS)
    page.goto(f"{server.url}/#/models?workflowType=machine_learning")
    page.get_by_text("cartpole-demo").first.wait_for()
    page.wait_for_timeout(2000)  # a one-time "new Model Registry UI" announcement may open over the list
    dialog = page.get_by_role("dialog")
    if dialog.count():
        dialog.get_by_role("button", name="Close").first.click()
        page.get_by_text("Flexible, governed deployments").first.wait_for(state="hidden")
    save_shot(page, tmp_path, "ui-models.png")
    page.goto(f"{server.url}/#/models/cartpole-demo/versions/{promoted.version}?workflowType=machine_learning")
    page.get_by_text("cartpole-reinforce").first.wait_for()  # the source run, linked by name
    page.get_by_text("prod").first.wait_for()  # the alias
    body = page.inner_text("body")
    assert "Source Run" in body and "Source Model" in body, body[:2000]  # the run and the LoggedModel, linked
    assert not re.search(r"(?i)\berror\b|failed to|not found", body), body[:2000]
    save_shot(page, tmp_path, "ui-model-version.png")
    context.close()

