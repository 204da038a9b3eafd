"""Dynamic batching: uploads from concurrent requests share one trip to the model thread and one model call.

Under load the server gathers what arrived during a short window (and everything that queued while the model was
busy) into one batch. The model runs in a single dedicated thread: the event loop keeps accepting requests, and
two model calls never fight over the same cores. The uploads are decoded there too: one thread hop per batch
rather than one per upload, whose executor submit, thread wake-up and GIL hand-back took about a third of the
event loop's CPU time under load (0.8 -> 0.55 ms per image).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

PrepareFn = Callable[[Any], Image.Image]  # an upload -> the decoded image (raising the request's error if it can't)
PredictFn = Callable[[list[Image.Image]], np.ndarray]
Outcome = tuple[Image.Image, np.ndarray] | Exception


@dataclass
class BatchStats:
    """Counters for /health: `largest > 1` shows that concurrent requests were really batched."""

    batches: int = 0
    images: int = 0
    largest: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.largest = max(self.largest, size)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": round(self.images / self.batches, 2) if self.batches else 0.0}


class Batcher:
    """`await batcher.predict(items)` -> the decoded images and their (N, classes) probabilities, computed together
    with other requests' items."""

    def __init__(self, prepare: PrepareFn, predict: PredictFn, max_batch: int = 32, wait_s: float = 0.003) -> None:
        self._prepare, self._predict = prepare, predict
        self.max_batch, self.wait_s = max_batch, wait_s
        self._executor: ThreadPoolExecutor | None = None
        self.stats = BatchStats()
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._arriving = 0  # requests being received: items on their way to the queue
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the model thread and the batching loop on the running event loop (the server's lifespan does)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferkit-model")
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="transferkit-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._pending:
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Held by a request while it is read. The batch window only waits while some request is on its way: a lone
        request is not delayed for company that is not coming."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def predict(self, items: list[Any]) -> tuple[list[Image.Image], np.ndarray]:
        """The items' images and probabilities, or the first item's error (an upload that does not decode)."""
        if self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending += zip(items, futures, strict=True)
        self._wake.set()
        # Every outcome is collected, so a second bad file's error is not left unretrieved (asyncio would log it).
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        if failed := next((o for o in outcomes if isinstance(o, BaseException)), None):
            raise failed
        return [image for image, _ in outcomes], np.stack([row for _, row in outcomes])

    async def run_in_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Other model work (Grad-CAM) in the same thread, so it queues behind batches instead of competing."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            if len(self._pending) < self.max_batch and self._arriving:
                # A short window for requests on their way to join. A plain sleep (rather than wait_for on a
                # queue) cannot lose an item to a timeout racing a get.
                await asyncio.sleep(self.wait_s)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if not self._pending:
                self._wake.clear()
            await self._run(batch)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        live = [(item, future) for item, future in batch if not future.done()]  # a client that left costs nothing
        if not live:
            return
        try:
            outcomes = await self.run_in_model_thread(self._prepare_and_predict, [item for item, _ in live])
        except Exception as exc:  # every waiting request gets the error; the loop itself lives on
            outcomes = [exc] * len(live)
        if predicted := sum(not isinstance(outcome, Exception) for outcome in outcomes):
            self.stats.record(predicted)
        for (_, future), outcome in zip(live, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _prepare_and_predict(self, items: list[Any]) -> list[Outcome]:
        """In the model thread: decode each item, then one model call for those that decoded. An item that fails
        fails only its own request, never the batch it shares with others."""
        prepared: list[Image.Image | Exception] = []
        for item in items:
            try:
                prepared.append(self._prepare(item))
            except Exception as exc:  # noqa: BLE001 - it goes to that item's request
                prepared.append(exc)
        images = [p for p in prepared if not isinstance(p, Exception)]
        rows = iter(self._predict(images) if images else [])
        return [p if isinstance(p, Exception) else (p, next(rows)) for p in prepared]
