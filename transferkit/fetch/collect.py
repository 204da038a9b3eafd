"""`fetch_dataset`: a CSV of image URLs in; out, a dataset folder `transferkit train` reads, and a report of every
row that did not make it."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from transferkit.fetch.download import FetchFailure, Limits, download, make_client
from transferkit.fetch.rows import Row, RowProblem, read_rows, row_folder
from transferkit.fetch.store import FetchState, content_digest, image_extension, write_inside
from transferkit.fileio import atomic_write, output_folder
from transferkit.progress import Reporter

T = TypeVar("T")

REPORT_NAME = "fetch_report.json"
_SAVE_STATE_EVERY_S = 2.0  # often enough that an interruption loses little, rarely enough for 100k-row states


@dataclass(frozen=True)
class FetchOptions:
    workers: int = 8  # downloads at the same time
    limits: Limits = field(default_factory=Limits)
    retry_failed: bool = False  # fetch again URLs that failed for good in an earlier run


@dataclass(frozen=True)
class Outcome:
    row: Row
    entry: dict  # as in the state file: status ("stored", "duplicate", "failed") + path and digest, or reason
    source: str  # "download" (this run), "earlier run" (the state file), "row" (the CSV row itself is unusable)


@dataclass
class _Run:
    """What every row's task shares; tasks run on one event loop, so plain dicts need no lock."""

    out: Path
    with_splits: bool
    options: FetchOptions
    state: FetchState
    client: httpx.AsyncClient
    digests: dict[str, str]  # content digest -> path of the copy kept
    last_save: float = field(default_factory=time.monotonic)

    def record(self, url: str, entry: dict) -> None:
        self.state.entries[url] = entry
        if time.monotonic() - self.last_save > _SAVE_STATE_EVERY_S:
            self.state.save()
            self.last_save = time.monotonic()


def fetch_dataset(csv_path: Path, out: Path, options: FetchOptions | None = None,
                  reporter: Reporter | None = None) -> dict:
    """Download, validate and store every row's image; write and return the report (see `build_report`).
    Bad input (the CSV, `out`) is a UserError; a row that fails is only reported."""
    options, reporter = options or FetchOptions(), reporter or Reporter(quiet=True)
    rows, with_splits = read_rows(Path(csv_path))
    out = output_folder(Path(out))
    state = FetchState.load(out, reporter.warn)
    try:
        outcomes = run_to_completion(_fetch_rows(rows, with_splits, out, options, state, reporter))
    finally:
        state.save()  # after Ctrl-C too: what finished is not fetched again
    report = build_report(Path(csv_path), out, outcomes)
    atomic_write(out / REPORT_NAME, json.dumps(report, indent=2))
    return report


def run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from code that already runs an event loop (a Jupyter cell), where asyncio.run refuses:
    there the coroutine gets its own loop in a helper thread, and this call waits for it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _fetch_rows(rows: list[Row], with_splits: bool, out: Path, options: FetchOptions, state: FetchState,
                      reporter: Reporter) -> list[Outcome]:
    """Every row's outcome, in CSV order; `options.workers` rows are in flight at a time."""
    repeats = _repeated_urls(rows)
    outcomes: list[Outcome | None] = [None] * len(rows)
    pending = iter(enumerate(rows))  # shared by the workers: each row is taken by exactly one
    async with make_client(options.limits, options.workers) as client:
        run = _Run(out, with_splits, options, state, client, state.stored_digests())
        with reporter.bar("fetching", len(rows)) as advance:

            async def worker() -> None:
                for index, row in pending:
                    outcomes[index] = await _fetch_row(row, run, repeats)
                    advance(1)

            await asyncio.gather(*(worker() for _ in range(options.workers)))
    return outcomes


def _repeated_urls(rows: list[Row]) -> dict[int, int]:
    """line -> line of the first row with the same URL, for every later row that repeats one."""
    first: dict[str, int] = {}
    repeats = {}
    for row in rows:
        if row.url in first:
            repeats[row.line] = first[row.url]
        elif row.url:
            first[row.url] = row.line
    return repeats


async def _fetch_row(row: Row, run: _Run, repeats: dict[int, int]) -> Outcome:
    try:
        folder = row_folder(row, run.with_splits)
        if row.line in repeats:
            raise RowProblem(f"URL already listed on line {repeats[row.line]}")
    except RowProblem as problem:  # not recorded in the state: it depends on the CSV, which may be fixed
        return Outcome(row, _failed(str(problem), permanent=True), "row")
    earlier = run.state.settled(row.url, run.options.retry_failed)
    if earlier:
        return Outcome(row, earlier, "earlier run")
    entry = await _download_and_store(row.url, folder, run)
    run.record(row.url, entry)
    return Outcome(row, entry, "download")


async def _download_and_store(url: str, folder: Path, run: _Run) -> dict:
    """The state entry for one URL: its image stored (or found to be a duplicate), or why not."""
    try:
        data = await download(run.client, url, run.options.limits)
        extension = await asyncio.to_thread(image_extension, data)  # decoding off the event loop
    except FetchFailure as failure:
        return _failed(failure.reason, failure.permanent)
    digest = content_digest(data)
    if digest in run.digests:
        return {"status": "duplicate", "path": run.digests[digest], "digest": digest}
    relative = folder / f"{digest}{extension}"
    run.digests[digest] = relative.as_posix()  # claimed before the write awaits, so a concurrent twin sees it
    try:
        await asyncio.to_thread(write_inside, run.out, relative, data)
    except FetchFailure as failure:
        del run.digests[digest]
        return _failed(failure.reason, failure.permanent)
    return {"status": "stored", "path": relative.as_posix(), "digest": digest}


def _failed(reason: str, permanent: bool) -> dict:
    return {"status": "failed", "reason": reason, "permanent": permanent}


def build_report(csv_path: Path, out: Path, outcomes: list[Outcome]) -> dict:
    """Counts over all rows (earlier runs' outcomes included), every failure and every duplicate, in CSV order."""
    status = Counter(o.entry["status"] for o in outcomes)
    source = Counter(o.source for o in outcomes)
    return {
        "csv": str(csv_path),
        "out": str(out),
        "counts": {
            "rows": len(outcomes),
            "stored": status["stored"],
            "duplicates": status["duplicate"],
            "failed": status["failed"],
            "fetched": source["download"],  # rows downloaded (or tried) by this run
            "from_earlier_runs": source["earlier run"],
        },
        "failures": _rows_with(outcomes, "failed", lambda e: {"reason": e["reason"], "permanent": e["permanent"]}),
        "duplicates": _rows_with(outcomes, "duplicate", lambda e: {"duplicate_of": e["path"]}),
    }


def _rows_with(outcomes: list[Outcome], status: str, details: Callable[[dict], dict]) -> list[dict]:
    return [{"line": o.row.line, "url": o.row.url, "label": o.row.label, **details(o.entry)}
            for o in outcomes if o.entry["status"] == status]
