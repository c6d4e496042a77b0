"""`Retriever` over HTTP: talks to our server or the original Search-R1 ``/retrieve`` server.

One POST per `search` call carries the whole batch (``return_scores`` true, so passages keep
their scores). Connection errors, timeouts and 5xx answers are retried up to ``retries``
times with exponential backoff (``backoff · 2^attempt`` seconds, each wait at most
``MAX_BACKOFF_S``) while the waits add up to at most ``max_wait_s``; after a connection
error the client first waits for the server to answer ``GET /health`` (any HTTP answer
counts, so servers without that route work too), so a restarting server (a wiki-18 index
takes minutes to load) is waited for instead of hammered. A 4xx is not retried. When the
server cannot be reached, :class:`RetrieverUnavailableError` names the URL. `retries_total`
counts the retries made, for the trainer's metrics. An optional LRU
cache (``cache_size`` entries of (query, topk)) sends only the queries it has not seen.
``truncated_queries`` counts the queries our server reported cutting to its length limit.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Sequence

import httpx

from searchr1_jax.retrieval.types import Passage


MAX_BACKOFF_S = 30.0  # longest single wait between retries


class RetrieverError(RuntimeError):
    """The retrieval server answered something unusable (4xx, 5xx after retries, a bad body)."""


class RetrieverUnavailableError(RetrieverError):
    """The retrieval server could not be reached (after all retries)."""


def _passage(entry: object, url: str, where: str) -> Passage:
    """A Passage from one entry of the response, with or without scores."""
    document, score = entry, 0.0
    if isinstance(entry, dict) and "document" in entry:
        document, score = entry["document"], entry.get("score", 0.0)
    if not (isinstance(document, dict) and isinstance(document.get("contents"), str) and isinstance(score, (int, float))):
        raise RetrieverError(f"{url}: {where} is not a passage ({{'document': {{'id', 'contents'}}, 'score'}}): {str(entry)[:200]}")
    return Passage.from_contents(str(document.get("id", "")), document["contents"], float(score))


def parse_response(body: object, num_queries: int, url: str) -> list[list[Passage]]:
    """Passages per query from a ``/retrieve`` response body; errors name the URL."""
    rows = body.get("result") if isinstance(body, dict) else None
    if not isinstance(rows, list) or len(rows) != num_queries or not all(isinstance(r, list) for r in rows):
        raise RetrieverError(f"{url}: expected {{'result': [one list per query]}} for {num_queries} queries, got {str(body)[:200]}")
    return [[_passage(entry, url, f"result[{i}][{j}]") for j, entry in enumerate(row)] for i, row in enumerate(rows)]


class HttpRetriever:
    """`Retriever` over HTTP. `url` is the full endpoint, e.g. ``http://127.0.0.1:8000/retrieve``."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 max_wait_s: float = float("inf"), cache_size: int = 0):
        if retries < 0 or backoff < 0 or timeout <= 0 or cache_size < 0 or not max_wait_s >= 0:
            raise ValueError("timeout must be > 0 and retries, backoff, max_wait_s, cache_size >= 0")
        self.url = url
        self.health_url = url.rsplit("/", 1)[0] + "/health"
        self._retries = retries
        self._backoff = backoff
        self._max_wait_s = max_wait_s
        self.retries_total = 0
        self._client = httpx.Client(timeout=timeout)
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, int], list[Passage]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self.truncated_queries = 0  # queries the server reported cutting to its length limit

    def _post(self, queries: list[str], topk: int) -> list[list[Passage]]:
        payload = {"queries": queries, "topk": topk, "return_scores": True}
        last_error: Exception | None = None
        waited, attempts = 0.0, 0
        for attempt in range(self._retries + 1):
            if attempt:
                if waited >= self._max_wait_s:
                    break
                pause = min(self._backoff * 2 ** (attempt - 1), MAX_BACKOFF_S, self._max_wait_s - waited)
                time.sleep(pause)
                waited += pause
                self.retries_total += 1
            attempts = attempt + 1  # a try: the POST, or after a connection error first /health
            if attempt and isinstance(last_error, httpx.TransportError) and not self._answers_health():
                continue  # still down: wait again before sending the batch
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TransportError as err:  # refused, reset, DNS, timeout
                last_error = err
                continue
            if response.status_code >= 500:
                last_error = RetrieverError(f"{self.url}: HTTP {response.status_code}: {response.text[:500]}")
                continue
            if response.status_code != 200:
                raise RetrieverError(f"{self.url}: HTTP {response.status_code}: {response.text[:500]}")
            try:
                body = response.json()
            except ValueError:
                raise RetrieverError(f"{self.url}: the response is not JSON: {response.text[:200]}") from None
            passages = parse_response(body, len(queries), self.url)
            cut = body.get("truncated")  # our server's note of queries it cut to its length limit
            if isinstance(cut, list):
                self.truncated_queries += len(cut)
            return passages
        if isinstance(last_error, RetrieverError):
            raise RetrieverError(f"{last_error} (after {attempts} attempts)")
        raise RetrieverUnavailableError(
            f"retrieval server at {self.url} unreachable after {attempts} attempts over {waited:.1f} s: "
            f"{type(last_error).__name__}: {last_error}"
        )

    @contextlib.contextmanager
    def quick_retries(self, retries: int = 3, max_wait_s: float = 5.0):
        """Within the block, fail fast (a start-up probe must not wait minutes for a wrong URL)."""
        saved = self._retries, self._max_wait_s
        self._retries, self._max_wait_s = min(retries, self._retries), min(max_wait_s, self._max_wait_s)
        try:
            yield self
        finally:
            self._retries, self._max_wait_s = saved

    def _answers_health(self) -> bool:
        """Whether the server answers at all (any HTTP status) at its /health URL."""
        try:
            self._client.get(self.health_url)
        except httpx.TransportError:
            return False
        return True

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        queries = list(queries)
        if not queries:
            return []
        if not self._cache_size:
            return self._post(queries, topk)
        with self._cache_lock:
            found = {q: self._cache[(q, topk)] for q in queries if (q, topk) in self._cache}
            for q in found:
                self._cache.move_to_end((q, topk))
        missing = list(dict.fromkeys(q for q in queries if q not in found))
        if missing:
            fetched = dict(zip(missing, self._post(missing, topk)))
            with self._cache_lock:
                for q, passages in fetched.items():
                    self._cache[(q, topk)] = passages
                    self._cache.move_to_end((q, topk))
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            found.update(fetched)
        return [list(found[q]) for q in queries]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HttpRetriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
