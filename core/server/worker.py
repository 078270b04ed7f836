"""A compute worker: one thread that runs queued tasks by priority (inference steps before forward before backward).

Tasks come from the server's I/O thread and answer their request themselves, so the socket loop never waits on
torch. A task that raises a SwarmError answers with its code; any other exception is logged and answered as an
internal error. The worker never dies of a task.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from ...transport.errors import SwarmError
from ...transport.rpc import Request

log = logging.getLogger(__name__)

PRIORITY_STEP = 0
PRIORITY_FORWARD = 1
PRIORITY_BACKWARD = 2

Task = Callable[[], tuple[dict[str, Any], list[torch.Tensor]] | None]


class ComputeWorker:
    def __init__(self, name: str = "swarm-compute"):
        self._queue: queue.PriorityQueue[tuple[int, int, Request | None, Task | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = threading.Event()

    def start(self) -> ComputeWorker:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, priority: int, request: Request, task: Task) -> None:
        self._queue.put((priority, next(self._seq), request, task))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop (bounded by `timeout`)."""
        self._stopping.set()
        self._queue.put((99, next(self._seq), None, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            _, _, request, task = self._queue.get()
            if task is None or request is None:
                return
            try:
                result = task()
            except SwarmError as e:
                request.fail(e.code, str(e))
            except Exception as e:
                log.exception("task %s failed", request.message.type)
                request.fail("internal", f"{type(e).__name__}: {e}")
            else:
                if result is not None:  # None: the task hands its answer to someone else (e.g. a relay)
                    request.reply(*result)
