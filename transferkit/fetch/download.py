"""One URL's bytes, with every bound a hostile or broken server needs: per-operation timeouts, a deadline for the
whole download (retries included), a byte cap, a redirect cap, and retries with backoff for transient failures.

Why httpx's async client rather than threads and urllib: a trickling server (one byte every few seconds) never
trips a read timeout, and a blocked thread cannot be interrupted, so a total-time bound needs cancellation;
`asyncio.wait_for` cancels a download wherever it waits (connecting, headers, body). httpx also gives streaming
bodies, redirect limits and connection pooling, and is already what the tests use against `transferkit serve`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from transferkit import __version__

MB = 1 << 20


class FetchFailure(Exception):
    """A download or image that failed; `permanent` ones (404, not an image) are not retried by a later run."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # seconds for each connect, read or write
    max_time: float = 60.0  # seconds for one URL in all, retries and backoff included
    max_mb: float = 20.0  # body size cap, whatever Content-Length says
    retries: int = 3  # extra attempts after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    max_redirects: int = 5

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)


def make_client(limits: Limits, workers: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=limits.timeout,
        follow_redirects=True,
        max_redirects=limits.max_redirects,
        limits=httpx.Limits(max_connections=workers),
        # identity: images are compressed already, and a gzip body could inflate far past the byte cap per chunk
        headers={"User-Agent": f"transferkit/{__version__} (dataset fetch)", "Accept-Encoding": "identity"},
    )


async def download(client: httpx.AsyncClient, url: str, limits: Limits) -> bytes:
    """The body of `url`, or FetchFailure with a short reason."""
    try:
        return await asyncio.wait_for(_with_retries(client, url, limits), limits.max_time)
    except asyncio.TimeoutError as exc:  # from wait_for only: httpx's own timeouts become FetchFailures below
        raise FetchFailure(f"took longer than {limits.max_time:g} s in all", permanent=False) from exc


async def _with_retries(client: httpx.AsyncClient, url: str, limits: Limits) -> bytes:
    for attempt in range(limits.retries):
        try:
            return await _get(client, url, limits)
        except FetchFailure as failure:
            if failure.permanent:
                raise
        await asyncio.sleep(limits.backoff * 2**attempt)
    return await _get(client, url, limits)  # the last attempt: its failure is the one reported


async def _get(client: httpx.AsyncClient, url: str, limits: Limits) -> bytes:
    """One attempt: redirects followed, status and size checked, the body read up to the cap."""
    try:
        async with client.stream("GET", url) as response:
            _check_status(response)
            _check_declared_size(response, limits)
            return await _read_capped(response, limits)
    except httpx.TooManyRedirects as exc:
        raise FetchFailure(f"redirect loop or more than {limits.max_redirects} redirects", permanent=True) from exc
    except httpx.UnsupportedProtocol as exc:  # e.g. a redirect to ftp:// or file://
        raise FetchFailure(f"unsupported URL: {exc}", permanent=True) from exc
    except httpx.TimeoutException as exc:
        step = type(exc).__name__.removesuffix("Timeout").lower()  # connect, read, write, pool
        raise FetchFailure(f"timed out ({step}, {limits.timeout:g} s)", permanent=False) from exc
    except httpx.TransportError as exc:  # refused, reset, DNS failure, broken HTTP
        raise FetchFailure(f"connection failed: {exc or type(exc).__name__}", permanent=False) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # e.g. a body that does not match its Content-Encoding
        raise FetchFailure(f"bad response: {exc or type(exc).__name__}", permanent=True) from exc


def _check_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    status = response.status_code
    transient = status in (408, 429) or status >= 500  # the server may answer differently later
    raise FetchFailure(f"HTTP {status} {response.reason_phrase}".strip(), permanent=not transient)


def _check_declared_size(response: httpx.Response, limits: Limits) -> None:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(limits)


async def _read_capped(response: httpx.Response, limits: Limits) -> bytes:
    """The (decompressed) body, abandoned as soon as it passes the cap: a lying or missing Content-Length
    cannot make us hold more than one chunk over it."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limits.max_bytes:
            raise _too_large(limits)
    return bytes(body)


def _too_large(limits: Limits) -> FetchFailure:
    return FetchFailure(f"too large: more than {limits.max_mb:g} MB", permanent=True)
