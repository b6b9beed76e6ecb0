"""A short check of the CUDA paths on a machine with a GPU (not part of the test suite, which runs on CPU).

    python benchmarks/gpu_check.py            # ~1-2 min: async and sync saves of GPU state, verified loads,
                                              # then a 1-rank NCCL torchrun of fsdp_demo saved and resumed

Checks, each printed as PASS/FAIL: the async save's staging buffers are pinned host memory; the checkpoint holds
the GPU state as of save() although training changes it in place while the save runs; a load restores it onto
the GPU bit for bit; a sync save does the same; and under torchrun with NCCL, FSDP2 shards of CUDA tensors save
through DCP and resume. Also prints save() blocked time against a plain copy_ into pinned buffers (the floor).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def build(width: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step(model, opt, device)
    return model, opt


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
    loss = model(torch.randn(64, model[0].in_features, device=device)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def same(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v.cpu(), saved[k]) and v.is_cuda for k, v in model.state_dict().items())


def main() -> None:
    from tracked_ckpt import CheckpointManager

    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    model, opt = build(4096, dev)  # 4 x 16.8M params: ~270 MB of weights, ~800 MB with Adam state
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    print(f"state ~{nbytes / 1e6:.0f} MB on the GPU", flush=True)

    with CheckpointManager(work / "ck", experiment="gpu", async_save=True) as mgr:
        blocked = []
        for s in range(1, 5):
            saved = snapshot(model)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ref = mgr.save(model, opt, {"step": s, "reward": float(s)})
            blocked.append(time.perf_counter() - t0)
            step(model, opt, dev)  # training changes every tensor in place while the save runs
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            mgr.wait()
        entries = list(mgr._buffers._buffers.values())
        pinned = [buf.is_pinned() for buf, wants_pinned in entries if wants_pinned]
        check("staging buffers of CUDA tensors are pinned host memory", len(pinned) >= 24 and all(pinned),
              f"({sum(pinned)} pinned of {len(entries)} buffers)")
        fresh, fresh_opt = build(4096, dev)
        mgr.load(fresh, fresh_opt, ref)
        check("async save holds the GPU state as of save(); load restores it on the GPU", same(fresh, saved))
        # The floor: one copy_ of every GPU tensor of the state (weights and Adam moments) into pinned buffers.
        tensors = [*model.state_dict().values()]
        tensors += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.is_cuda]
        bufs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        floor = []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for buf, t in zip(bufs, tensors, strict=True):
                buf.copy_(t, non_blocking=True)
            torch.cuda.synchronize()
            floor.append(time.perf_counter() - t0)
        b, f = statistics.median(blocked[1:]), statistics.median(floor)
        print(f"async save blocked {b:.4f} s (median of saves 2-4); copy_ of the same GPU tensors into pinned "
              f"buffers {f:.4f} s (median of 4): {b / f:.2f}x", flush=True)

    with CheckpointManager(work / "ck-sync", experiment="gpu") as mgr:
        saved = snapshot(model)
        ref = mgr.save(model, opt, {"step": 1, "reward": 1.0})
        fresh, fresh_opt = build(4096, dev)
        mgr.load(fresh, fresh_opt, ref)
        check("sync save of GPU state loads back bit for bit onto the GPU", same(fresh, saved))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
           "tracked_ckpt.fsdp_demo", "--save-dir", str(work / "fsdp"), "--experiment", "gpu-fsdp", "--save-every", "2"]
    first = subprocess.run([*run, "--steps", "4"], env=env, cwd=work, capture_output=True, text=True, timeout=240)
    ok = first.returncode == 0 and "run_id " in first.stdout
    check("torchrun NCCL FSDP2 1 rank: DCP save of CUDA shards", ok,
          "" if ok else first.stdout[-2000:] + first.stderr[-3000:])
    if ok:
        run_id = next(x.split()[1] for x in first.stdout.splitlines() if x.startswith("run_id "))
        second = subprocess.run([*run, "--steps", "6", "--run-id", run_id, "--async-save"], env=env, cwd=work,
                                capture_output=True, text=True, timeout=240)
        ok2 = second.returncode == 0 and '"step": 6' in second.stdout
        check("torchrun NCCL FSDP2: resume by run ID from step 4, async DCP saves", ok2,
              "" if ok2 else second.stdout[-2000:] + second.stderr[-3000:])
    failed = [n for n, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
