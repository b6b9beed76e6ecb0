"""Many nodes, node-local disks (issue 17): two torchrun agents as two nodes against one real `mlflow server`.

The harness (tests/nodes.py) gives each node its own working directory, host name and fault proxy. One module
fixture plays the whole story once, because each launch costs ~30-50 s on 2 busy cores, and records what it
saw; each test then asserts its part of it from the outside (the job's printed events, each node's disk, each
proxy's byte counts, the run in MLflow):

1. two nodes train (FSDP2, gloo), a checkpoint every 6 steps; both proxies answer 503 for 10 s, then refuse for
   10 s (the server gone, as the clients see it), then pass; then the node without rank 0 is cut off for 8 s,
   then reconnected;
2. every node is SIGKILLed right after a save is recorded;
3. the job is relaunched at once on two fresh nodes (new directories, new host names; MLFLOW_RUN_ID, as a
   scheduler passes it) with ``lease_timeout=30``: the lease is the point there, 30 s keeps the wait short while
   the relaunch still meets a heartbeat younger than the lease; then every agent gets SIGTERM;
4. a plain process (world size 1) resumes the run.

A phase that fails is recorded, not raised, so the later phases still run and every test says what it proves.
"""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from nodes import Launch, Node, Server, launch, make_nodes, run_single, uts_namespaces, wait_until

from tracked_ckpt.catalog import RunCatalog
from tracked_ckpt.manifest import Manifest
from tracked_ckpt.store.run_store import RunStore

pytestmark = pytest.mark.server

LEASE_S = 30.0
PUBLISH_S = 10.0
OUTAGE_S = 20.0
CUT_S = 8.0
SAVE_EVERY = 6  # steps: a save every ~2-3 s on 2 busy cores
JOB = ("--width", "512", "--save-every", str(SAVE_EVERY), "--step-sleep", "0.3", "--hash-saves",
       "--publish-timeout", str(PUBLISH_S), "--lease-timeout", str(LEASE_S))  # fmt: skip


def catalog(url: str, run_id: str) -> RunCatalog:
    return RunCatalog(RunStore(MlflowClient(url), run_id))


def recorded_steps(url: str, run_id: str) -> list[int]:
    return [r.manifest.step for r in catalog(url, run_id).scan()]


def saved_steps(job: Launch, rank: int = 0) -> list[int]:
    """Steps whose ``save()`` returned on ``rank``."""
    return [e["step"] for e in job.of("save", rank=rank) if e["error"] is None]


def save_errors(job: Launch) -> list[str]:
    return [f"rank {e['rank']} step {e['step']}: {e['error']}" for e in job.of("save") if e["error"]]


def hashes(job: Launch) -> dict[int, str]:
    """The full-state hash at each save, as rank 0 printed it (rank 0 holds the gathered full state)."""
    return {e["step"]: e["hash"] for e in job.of("saving", rank=0)}


def share(manifest: Manifest, ranks: list[int]) -> int:
    """Bytes of the files the DCP load of ``ranks`` reads at the saving world size: their shards and RNG files,
    plus the files every rank reads (the DCP .metadata and the manifest)."""
    mine = {f"__{r}_0.distcp" for r in ranks} | {f"rng-{r}.json" for r in ranks} | {".metadata"}
    return sum(f.size for f in manifest.files if f.name in mine) + 4096  # + MANIFEST.json, a few KB at most


@dataclass
class Story:
    url: str
    first_nodes: list[Node]
    fresh_nodes: list[Node] = field(default_factory=list)
    run_id: str = ""
    first: Launch | None = None
    second: Launch | None = None
    single: Launch | None = None
    earlier: list[Launch] = field(default_factory=list)  # every launch before the relaunch on fresh nodes
    rank0: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # phase -> what went wrong
    seen: dict[str, Any] = field(default_factory=dict)  # what each phase measured

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            jobs = [j for j in (self.first, self.second) if j is not None]
            refused = [f"node {e['node']} rank {e['rank']}: {e['error']}" for j in jobs for e in j.of("open_failed")]
            tails = "\n".join(j.tail(25) for j in jobs)
            self.failed[name] = f"{type(e).__name__}: {e}\n{refused}\n{traceback.format_exc(limit=3)}\n{tails}"

    def check(self, name: str) -> None:
        """Fail the calling test with the phase's own failure, if it had one."""
        if name in self.failed:
            pytest.fail(f"phase {name!r} failed: {self.failed[name]}", pytrace=False)


def drained(story: Story, nodes: list[Node], job: Launch, timeout: float) -> float:
    """Seconds until the backlog is recorded: no node holds a checkpoint saved so far, and each is in the run.

    Training goes on saving meanwhile, so the queue as a whole may hold the newest save at any instant: the
    promise is about what was queued when the server came back.
    """
    backlog = saved_steps(job)
    up_to = max(backlog)
    return wait_until(lambda: all(n.pending(story.run_id, up_to=up_to) == 0 for n in nodes)
                      and set(backlog) <= set(recorded_steps(story.url, story.run_id)), timeout, step=0.2)  # fmt: skip


def server_outage(story: Story, job: Launch) -> None:
    nodes = story.first_nodes
    job.wait_for(lambda e: e["event"] == "save" and e["step"] >= 2 * SAVE_EVERY and e["rank"] == 0, 180,
                 "two saves")  # fmt: skip
    t_down = job.of("save", rank=0)[-1]["step"]
    for mode in ("503", "refuse"):  # a server answering 503 (an overloaded proxy in front of it), then gone
        for n in nodes:
            n.proxy.set_mode(mode)
        time.sleep(OUTAGE_S / 2)
    for n in nodes:
        n.proxy.set_mode("pass")
    during = [e for e in job.of("save", rank=0) if e["step"] > t_down]
    story.seen["outage_blocked"] = [e["blocked"] for e in during]
    story.seen["up_blocked"] = [e["blocked"] for e in job.of("save", rank=0) if e["step"] <= t_down]
    story.seen["outage_steps"] = [e["step"] for e in during]
    errors = save_errors(job)
    assert not errors, errors
    assert during, "no save returned during the outage"
    story.seen["outage_drain_s"] = drained(story, nodes, job, 60)


def node_cut_off(story: Story, job: Launch) -> None:
    cut = story.first_nodes[1 - story.rank0]
    before = job.of("save", rank=0)[-1]["step"]
    up_before = cut.proxy.up
    cut.proxy.set_mode("refuse")
    time.sleep(CUT_S)
    cut.proxy.set_mode("pass")
    back = time.monotonic()
    steps = [s for s in saved_steps(job) if s > before]
    story.seen["cut_steps"] = steps
    errors = save_errors(job)
    assert not errors, errors
    assert steps, "no save returned while the node was cut off"
    drained(story, story.first_nodes, job, 60)  # its backlog (and rank 0's) uploaded, every step recorded
    story.seen["cut_drain_s"] = time.monotonic() - back
    story.seen["cut_uploaded"] = cut.proxy.up - up_before


def kill_after_a_recorded_save(story: Story, job: Launch) -> None:
    if all(p.poll() is not None for p in job.procs):  # an earlier phase ended the job: start it again to kill it
        story.seen["kill_relaunched"] = True
        job = story.first = launch(story.first_nodes, *JOB, env={"MLFLOW_RUN_ID": story.run_id})
        story.earlier.append(job)
        job.wait_for(lambda e: e["event"] == "loaded" and e["rank"] == 0, LEASE_S + 120, "loaded")
    last = job.of("save", rank=0)[-1]["step"] if job.of("save", rank=0) else 0
    job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] > last, 60, "one more save")
    drained(story, story.first_nodes, job, 30)
    for i in range(len(job.procs)):
        job.kill_node(i)
    job.wait(30)


def relaunch_on_fresh_nodes(story: Story, tmp: Path) -> None:
    story.seen["latest_at_kill"] = recorded_steps(story.url, story.run_id)[-1]
    story.fresh_nodes = make_nodes(tmp / "fresh", story.url, ["node-c", "node-d"])
    story.second = job = launch(story.fresh_nodes, *JOB, "--sigterm", env={"MLFLOW_RUN_ID": story.run_id})
    loaded = [job.wait_for(lambda e, r=r: e["event"] == "loaded" and e["rank"] == r, LEASE_S + 120, "loaded")
              for r in (0, 1)]  # fmt: skip
    story.seen["resume_s"] = max(e["at"] for e in loaded)
    story.seen["loaded"] = {e["rank"]: e for e in loaded}


def sigterm_every_agent(story: Story, job: Launch) -> None:
    start = job.of("loaded", rank=0)[0]["step"]
    job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] > start, 60, "a save after resume")
    job.signal_agents(signal.SIGTERM)
    story.seen["agent_rcs"] = job.wait(90)
    said = [line.strip() for i in range(len(job.procs)) for line in job.output(i).splitlines()]
    story.seen["rank_exits"] = [line for line in said if "exitcode" in line or "Signal" in line]


@pytest.fixture(scope="module")
def story(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    tmp = tmp_path_factory.mktemp("nodes")
    s = Story(mlflow_server, make_nodes(tmp / "first", mlflow_server, ["node-a", "node-b"]))
    print(f"distinct host names via unshare --uts: {uts_namespaces()}")
    s.first = first = launch(s.first_nodes, *JOB, "--experiment", f"nodes-{tmp.name}")
    s.earlier.append(first)
    try:
        with s.phase("start"):
            s.rank0 = first.rank0_node()
            s.run_id = first.of("start", rank=0)[0]["run_id"]
        with s.phase("outage"):
            server_outage(s, first)
        with s.phase("cut"):
            node_cut_off(s, first)
        with s.phase("kill"):
            kill_after_a_recorded_save(s, first)
        first.kill_all()
        with s.phase("relaunch"):
            relaunch_on_fresh_nodes(s, tmp)
        if s.second is not None:
            with s.phase("refused"):
                s.seen["other_job"] = run_single(tmp / "other", mlflow_server, "--width", "512", "--steps", "0",
                                                 "--run-id", s.run_id)  # fmt: skip
            with s.phase("sigterm"):
                sigterm_every_agent(s, s.second)
            s.second.kill_all()
        with s.phase("single"):
            s.single = run_single(tmp / "single", mlflow_server, "--width", "512", "--steps", "0",
                                  "--lease-timeout", str(LEASE_S), "--run-id", s.run_id)  # fmt: skip
        yield s
    finally:
        for j in [*s.earlier, s.second]:
            if j is not None:
                j.kill_all()
        for n in s.first_nodes + s.fresh_nodes:
            n.proxy.close()


def test_a_server_outage_raises_nothing_loses_nothing_and_every_node_drains(story: Story) -> None:
    story.check("start")
    story.check("outage")
    assert story.first is not None
    up, down = story.seen["up_blocked"], story.seen["outage_blocked"]
    print(f"save blocked with the server up {up}, during the {OUTAGE_S:.0f} s outage {down}")
    # Training went on through the outage (a save every ~2-3 s here), no save waiting longer than its budget.
    assert len(down) >= 3 and max(down) <= PUBLISH_S + 3, (up, down)
    # Within 10 s of the server answering again, every node's outbox is empty and every save is recorded.
    assert story.seen["outage_drain_s"] <= 10, story.seen
    for r in catalog(story.url, story.run_id).scan():  # every recorded checkpoint is whole in the store
        listed = {f.path.rsplit("/", 1)[1]: f.file_size for f in MlflowClient(story.url).list_artifacts(
            story.run_id, r.path)}  # fmt: skip
        assert {f.name: f.size for f in r.manifest.files}.items() <= listed.items(), r.path


def test_c_one_node_cut_off_its_backlog_is_recorded_from_that_node(story: Story) -> None:
    story.check("start")
    story.check("outage")
    story.check("cut")
    assert story.seen["cut_drain_s"] <= 10, story.seen
    # "From that node": the cut node's own proxy carried at least its shards of the saves made while it was cut.
    latest = catalog(story.url, story.run_id).scan()[-1].manifest
    cut_rank = 1 if story.rank0 == 0 else 0  # one rank per node: the cut node runs the rank that is not 0
    shard = next(f.size for f in latest.files if f.name == f"__{cut_rank}_0.distcp")
    assert story.seen["cut_uploaded"] >= 0.9 * shard * len(story.seen["cut_steps"]), story.seen


def test_d_sigkill_and_relaunch_on_fresh_nodes_resumes_with_equal_state_in_time(story: Story) -> None:
    story.check("start")
    story.check("kill")  # the relaunch proves nothing unless every node was SIGKILLed with its lease alive
    story.check("relaunch")
    assert story.first is not None
    loaded = story.seen["loaded"]
    assert loaded[0]["step"] == story.seen["latest_at_kill"] > 0, story.seen
    saved = {k: v for j in story.earlier for k, v in hashes(j).items()}
    assert loaded[0]["hash"] == saved[loaded[0]["step"]]  # full model + optimizer state, as at that save
    assert story.seen["resume_s"] <= LEASE_S + 30, story.seen
    hosts = {e["host"] for e in story.second.of("start")} if story.second else set()
    assert not uts_namespaces() or hosts == {"node-c", "node-d"}


def test_d_a_different_live_job_on_the_run_is_refused_at_once(story: Story) -> None:
    story.check("relaunch")
    story.check("refused")
    other: Launch = story.seen["other_job"]  # a plain process on another host, while the relaunched job is alive
    failed = other.of("open_failed")
    assert other.procs[0].returncode != 0 and failed, other.tail()
    assert failed[0]["error"].startswith("RunLockedError"), failed
    assert failed[0]["seconds"] <= LEASE_S / 4 + 5, failed  # at once: within one heartbeat interval, not a lease


def test_e_each_node_downloads_its_share_on_resume(story: Story) -> None:
    story.check("relaunch")
    assert story.second is not None
    at_kill = story.seen["latest_at_kill"]
    manifest = next(r.manifest for r in catalog(story.url, story.run_id).scan() if r.manifest.step == at_kill)
    for e in story.seen["loaded"].values():
        mine = share(manifest, [e["rank"]])
        print(f"node {e['node']} (rank {e['rank']}) downloaded {e['down']} B for a share of {mine} B: "
              f"{e['down'] / mine:.2f}x")  # fmt: skip
        assert e["down"] <= 1.1 * mine, (e, mine)
    # Each node's copy is a verified local folder in its own save_dir, kept for the next launch.
    for n in story.fresh_nodes:
        assert any(n.save_dir.glob(f"{story.run_id}/step-*/MANIFEST.json")), n.save_dir


def test_f_a_plain_process_resumes_a_two_node_checkpoint_at_world_size_1(story: Story) -> None:
    story.check("single")
    assert story.single is not None
    assert story.single.procs[0].returncode == 0, story.single.tail()
    loaded = story.single.of("loaded")[0]
    known = {k: v for j in [*story.earlier, story.second] if j is not None for k, v in hashes(j).items()}
    assert loaded["step"] > 0 and loaded["hash"] == known[loaded["step"]], (loaded, known)


def test_g_sigterm_to_every_agent_writes_one_final_checkpoint_on_every_node(story: Story) -> None:
    story.check("relaunch")
    story.check("sigterm")
    assert story.second is not None
    finals = {e["rank"]: e for e in story.second.of("save")}  # each rank's last save event
    print("agents exited", story.seen["agent_rcs"], "; the final save raised", {r: e["error"] for r, e in
          finals.items()}, "; agents said", story.seen["rank_exits"])  # fmt: skip
    assert set(finals) == {0, 1} and len({e["step"] for e in finals.values()}) == 1, finals
    final = finals[0]["step"]
    name = f"step-{final:08d}"
    for n in story.fresh_nodes:  # committed on every node's disk, and recorded or queued
        assert (n.save_dir / story.run_id / name / "MANIFEST.json").exists(), (n.host, sorted(n.save_dir.rglob("*")))
    assert final in recorded_steps(story.url, story.run_id) or any(
        p.step == final for n in story.fresh_nodes for p in _pending(n, story.run_id)
    )
    # As it is (torch 2.13): every rank leaves through SystemExit(143) from that save; each agent, signalled
    # itself, raises SignalException and exits 1.
    assert {e["error"] for e in finals.values()} == {"SystemExit: 143"}, finals
    assert story.seen["agent_rcs"] == [1, 1], story.seen


def _pending(node: Node, run_id: str) -> list[Any]:
    from tracked_ckpt.outbox import Outbox

    return Outbox(node.save_dir).pending(run_id)


# ------------------------------------------------------------------------------- long variants (--run-slow)


@pytest.mark.slow
def test_b_a_hung_server_costs_the_first_save_its_budget_then_nothing(mlflow_server: str, tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, mlflow_server, ["node-a", "node-b"])
    job = launch(nodes, *JOB, "--experiment", f"nodes-hang-{tmp_path.name}")
    try:
        job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] >= 2 * SAVE_EVERY, 180,
                     "two saves")  # fmt: skip
        up = max(e["blocked"] for e in job.of("save", rank=0))
        last = job.of("save", rank=0)[-1]["step"]
        for n in nodes:
            n.proxy.set_mode("hang")
        job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] >= last + 3 * SAVE_EVERY,
                     3 * PUBLISH_S + 90,
                     "three saves while the server hangs")  # fmt: skip
        for n in nodes:
            n.proxy.set_mode("pass")
        back = time.monotonic()
        assert not save_errors(job), save_errors(job)
        during = [e["blocked"] for e in job.of("save", rank=0) if e["step"] > last]
        print(f"save blocked with the server up: <= {up:.2f} s; while it hangs: {during}")
        assert during[0] <= PUBLISH_S + 3, during  # the first save of the outage: at most its budget
        assert max(during[1:]) <= up + 1.5, (up, during)  # later ones: their local commit
        run_id = job.of("start", rank=0)[0]["run_id"]
        wait_until(lambda: all(n.pending(run_id) == 0 for n in nodes), 10 + (time.monotonic() - back), step=0.2)
        assert time.monotonic() - back <= 10
    finally:
        job.kill_all()
        for n in nodes:
            n.proxy.close()


@pytest.mark.slow
def test_e_two_ranks_per_node_fetch_once_per_node_and_a_same_node_relaunch_fetches_nothing(
    mlflow_server: str, tmp_path: Path
) -> None:
    args = ("--width", "512", "--steps", "2", "--save-every", "2", "--lease-timeout", "5")
    first = make_nodes(tmp_path / "first", mlflow_server, ["node-a", "node-b"])
    fresh = make_nodes(tmp_path / "fresh", mlflow_server, ["node-c", "node-d"])
    try:
        job = launch(first, *args, "--experiment", f"nodes-4-{tmp_path.name}", nproc=2)
        assert job.wait(240) == [0, 0], job.tail()
        run_id = job.of("start", rank=0)[0]["run_id"]
        manifest = catalog(mlflow_server, run_id).scan()[-1].manifest
        for attempt in ("fresh nodes", "same nodes"):
            for n in fresh:
                n.proxy.up = n.proxy.down = 0
            again = launch(fresh, *args, nproc=2, env={"MLFLOW_RUN_ID": run_id})
            assert again.wait(240) == [0, 0], again.tail()
            for i, n in enumerate(fresh):
                ranks = sorted(e["rank"] for e in again.of("start") if e["node"] == i)
                mine = share(manifest, ranks)
                print(f"{attempt}: {n.host} (ranks {ranks}) downloaded {n.downloaded()} B, share {mine} B")
                assert len(ranks) == 2
                assert n.downloaded() <= (1.1 if attempt == "fresh nodes" else 0.05) * mine, (attempt, ranks)
    finally:
        for n in first + fresh:
            n.proxy.close()


@pytest.mark.slow
def test_a_the_server_process_sigkilled_and_started_again_20_s_later(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    server.start()
    nodes = make_nodes(tmp_path, server.url, ["node-a", "node-b"])
    job = launch(nodes, *JOB, "--experiment", "nodes-server-kill")
    try:
        job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] >= 2 * SAVE_EVERY, 180,
                     "two saves")  # fmt: skip
        run_id = job.of("start", rank=0)[0]["run_id"]
        last = job.of("save", rank=0)[-1]["step"]
        server.kill()
        time.sleep(OUTAGE_S)
        server.start()  # ~30-60 s here: the outage lasts until it answers
        during = [e["step"] for e in job.of("save", rank=0) if e["step"] > last and e["error"] is None]
        errors = save_errors(job)
        assert not errors, errors
        assert during, f"no save returned while the server was gone:\n{job.tail(10)}"
        # The backlog: every save up to the server's return. Training goes on saving, so the queue as a whole may
        # hold the newest save at any instant; what was queued during the outage must be gone within 10 s.
        backlog = [s for s in saved_steps(job) if s <= during[-1]]
        drained_s = wait_until(lambda: all(n.pending(run_id, up_to=during[-1]) == 0 for n in nodes) and set(
            backlog) <= set(recorded_steps(server.url, run_id)), 60, step=0.2)  # fmt: skip
        print(f"saves while the server was gone: {during}; all recorded {drained_s:.1f} s after it answered")
        assert drained_s <= 10 and not save_errors(job)
    finally:
        job.kill_all()
        server.kill()
        for n in nodes:
            n.proxy.close()
