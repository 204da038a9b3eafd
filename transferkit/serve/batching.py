"""Dynamic batching: images from concurrent requests share one model call.

A CNN on a CPU processes a batch of 16 in far less than 16 times the time of one, so under load the server
gathers what arrived during a short window (and everything that queued while the model was busy) into one call.
The model runs in a single dedicated thread: the event loop keeps accepting requests, and two model calls never
fight over the same cores.
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

PredictFn = Callable[[list[Image.Image]], np.ndarray]


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
    """`await batcher.predict(images)` -> (N, classes) probabilities, computed together with other requests' images."""

    def __init__(self, predict: PredictFn, max_batch: int = 32, wait_s: float = 0.003) -> None:
        self._predict = predict
        self.max_batch, self.wait_s = max_batch, wait_s
        self._executor: ThreadPoolExecutor | None = None
        self.stats = BatchStats()
        self._pending: list[tuple[Image.Image, asyncio.Future]] = []
        self._arriving = 0  # requests being received or decoded: images on their way to the queue
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
        """Held by a request while it is read and decoded. The batch window only waits while some request is on its
        way: a lone request is not delayed for company that is not coming."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def predict(self, images: list[Image.Image]) -> np.ndarray:
        if self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self._pending += zip(images, futures, strict=True)
        self._wake.set()
        return np.stack(await asyncio.gather(*futures))

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

    async def _run(self, batch: list[tuple[Image.Image, asyncio.Future]]) -> None:
        live = [(image, future) for image, future in batch if not future.done()]  # a client that left costs nothing
        if not live:
            return
        try:
            probs = await self.run_in_model_thread(self._predict, [image for image, _ in live])
        except Exception as exc:  # every waiting request gets the error; the loop itself lives on
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        self.stats.record(len(live))
        for (_, future), row in zip(live, probs, strict=True):
            if not future.done():
                future.set_result(row)
