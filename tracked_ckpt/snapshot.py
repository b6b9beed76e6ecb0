"""Async save: copy the state into reused host buffers, then write and publish it on one background thread.

The training thread is blocked only while ``StagingBuffers.copy`` copies every tensor into host memory
(pinned when the tensor is on a GPU). The buffers are kept and reused by the next save: on this machine a
copy into existing buffers costs a fraction of allocating fresh ones (1 GB: ~0.07 s vs ~0.5 s, docs/performance.md).
``BackgroundSaver`` runs the rest of a save (serialize, hash, fsync, upload, MLflow calls, retention) on one
worker thread fed by a queue, at most one save at a time, and keeps its failure for ``wait()``/``close()``.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SaveError

log = logging.getLogger(__name__)

_PIECE = 64 << 20  # large tensors are copied in pieces, shared between two threads
_ATOMS = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


class StagingBuffers:
    """Host copies of a state payload, written into buffers reused from one save to the next."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], tuple[torch.Tensor, bool]] = {}  # path in the payload: (buffer, pinned)
        self._helper: ThreadPoolExecutor | None = None

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b, _ in self._buffers.values())

    def clear(self) -> None:
        self._buffers = {}
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None

    def copy(self, payload: Any) -> Any:
        """A copy of ``payload`` whose tensors live in the staging buffers; returns when the copy is complete.

        Containers are rebuilt (an OrderedDict keeps its ``_metadata``), other values deep-copied, and a tensor
        that appears twice in the payload is copied once, so sharing survives as it does in ``torch.save``.
        """
        used: dict[tuple[Any, ...], tuple[torch.Tensor, bool]] = {}
        copies: list[tuple[int, int, int]] = []  # (dst, src, nbytes) for CPU tensors, run after the walk
        seen: dict[int, torch.Tensor] = {}
        on_gpu = False

        def tensor(t: torch.Tensor, key: tuple[Any, ...]) -> torch.Tensor:
            nonlocal on_gpu
            if id(t) in seen:
                return seen[id(t)]
            if t.layout != torch.strided or t.is_quantized or type(t) not in (torch.Tensor, torch.nn.Parameter):
                out = t.detach().to("cpu", copy=True)  # rare kinds: a fresh copy, no reuse
            else:
                pin = t.is_cuda  # other accelerators: a plain blocking copy_
                buf, pinned = self._buffers.get(key, (None, False))
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or pinned != pin:
                    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                if t.device.type == "cpu" and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
                    nbytes = t.numel() * t.element_size()
                    for off in range(0, nbytes, _PIECE):
                        copies.append((buf.data_ptr() + off, t.data_ptr() + off, min(_PIECE, nbytes - off)))
                else:  # from a GPU into pinned memory by DMA; synchronized below, before returning
                    buf.copy_(t.detach(), non_blocking=pin)
                on_gpu = on_gpu or pin
                used[key] = (buf, pin)
                out = torch.nn.Parameter(buf, requires_grad=t.requires_grad) if type(t) is torch.nn.Parameter else buf
            seen[id(t)] = out
            return out

        def visit(obj: Any, key: tuple[Any, ...]) -> Any:
            if isinstance(obj, torch.Tensor):
                return tensor(obj, key)
            if isinstance(obj, _ATOMS):
                return obj
            if isinstance(obj, dict):
                items = [(k, visit(v, (*key, k))) for k, v in obj.items()]
                out: Any = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
                if hasattr(obj, "_metadata"):  # module state_dicts carry per-module versions here
                    out._metadata = copy.deepcopy(obj._metadata)
                return out
            if isinstance(obj, list):
                return [visit(v, (*key, i)) for i, v in enumerate(obj)]
            if isinstance(obj, tuple):
                values = [visit(v, (*key, i)) for i, v in enumerate(obj)]
                return type(obj)(*values) if hasattr(obj, "_fields") else tuple(values)
            return copy.deepcopy(obj)

        result = visit(payload, ())
        self._memcpy(copies)
        if on_gpu:
            torch.cuda.synchronize()  # the copies must be complete before training may change the tensors
        self._buffers = used  # buffers of keys gone from the state are dropped
        return result

    def _memcpy(self, copies: list[tuple[int, int, int]]) -> None:
        """memcpy every piece, on this thread and one helper taking pieces from the same list.

        Not torch's copy_: its OpenMP pool, woken after idling, took 0.1-0.3 s to start on this busy 2-core
        machine. ``ctypes.memmove`` releases the GIL; this thread never waits for the helper to start, only
        for the piece it is copying, so a late helper costs nothing and a prompt one halves the time.
        """
        if not copies:
            return
        pieces = iter(sorted(copies, key=lambda c: -c[2]))
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    piece = next(pieces, None)
                if piece is None:
                    return
                ctypes.memmove(*piece)

        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracked_ckpt-copy")
        helped = self._helper.submit(drain)
        drain()
        helped.result()


@dataclass(frozen=True)
class _Job:
    step: int
    run: Callable[[], object]


class BackgroundSaver:
    """One worker thread fed by a queue; at most one save in flight; its failure re-raised by ``wait()``."""

    def __init__(self, name: str = "tracked_ckpt-save") -> None:
        self._name = name
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._queued = 0  # jobs submitted and not finished; idle when 0
        self._error: SaveError | None = None
        self._thread: threading.Thread | None = None

    def submit(self, step: int, run: Callable[[], object], *, wait: bool = True) -> None:
        """Queue ``run`` (the rest of the save of ``step``); first waits for the save in flight, if any.

        ``wait=False`` queues it behind the save in flight instead (work that must follow that save).
        """
        if wait:
            self.wait()
        if self._thread is None:
            # A daemon thread: the manager's close() (also run at exit) drains it; exit must never hang on it.
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        with self._lock:
            self._queued += 1
            self._idle.clear()
        self._queue.put(_Job(step, run))

    @property
    def busy(self) -> bool:
        """True while a submitted job has not finished."""
        return not self._idle.is_set()

    def wait(self) -> None:
        """Block until no save is in flight; raise (once) the SaveError of a save that failed."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> SaveError | None:
        """Drain, stop the worker, and return (not raise) a failure not yet reported."""
        self._idle.wait()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.run()
            except BaseException as e:
                error = e if isinstance(e, SaveError) else SaveError(
                    f"background save of step {job.step} failed: {type(e).__name__}: {e}"
                )  # fmt: skip
                if error is not e:
                    error.__cause__ = e
                self._error = self._error or error  # the first failure is the one to report
                log.debug("background save of step %d failed", job.step, exc_info=True)
            finally:
                with self._lock:
                    self._queued -= 1
                    if self._queued == 0:
                        self._idle.set()
