"""HTTP retrieval server speaking the original Search-R1 ``/retrieve`` API.

    python -m searchr1_jax.retrieval.server --index DIR --host 127.0.0.1 --port 8000 --topk 3

``POST /retrieve`` takes ``{"queries": [str], "topk": int|null, "return_scores": bool}``
(``topk`` null → the server's ``--topk``; ``return_scores`` defaults to false as in the
original) and answers ``{"result": [per query: [{"document": {"id", "contents"}, "score"}]]}``,
or, without scores, ``{"result": [per query: [{"id", "contents"}]]}``; ``contents`` is the
corpus line's stored text, byte for byte. ``GET /health`` answers ``{"status": "ok",
"queue": pending requests, "truncated_queries": queries cut so far}``. A query longer than
``--max-query-chars`` (a policy that rambles inside ``<search>``) is cut to that many
characters, logged and counted, and the batch is answered (the body then also holds
``"truncated": [positions of the cut queries]``): rejecting the whole batch would
kill the original's client, which reads ``result`` unconditionally. Malformed requests (not
JSON, wrong types, too many queries, topk out of range) get a 4xx with a message saying
which limit; the server keeps serving. Unlike the original it binds 127.0.0.1 unless told
otherwise.

Limits against clients that misbehave, where the original has none: a body over
``--max-body-bytes`` gets 413 (checked on the declared length and while reading); request
headers must arrive within ``--header-timeout`` seconds and the body within
``--body-timeout`` (else the connection is closed, or 408), so slow or stalled clients cannot
hold connections open; JSON that Python cannot decode safely (a 5,000-digit integer, arrays
nested 100,000 deep) gets 400; a client that disconnects mid-request is one log line. On
SIGTERM or SIGINT the server stops accepting, gives in-flight requests at most
``--shutdown-timeout`` seconds, and exits 0. The interactive docs (``/docs``, ``/redoc``,
``/openapi.json``, which load JavaScript from a CDN) are off unless ``--docs``.

Micro-batching (:class:`MicroBatcher`): each request puts its queries on an asyncio queue
and awaits a future. One worker task takes everything queued (up to ``max_batch_queries``),
runs a single ``retriever.search`` over all of it on one background thread, and hands each
request its slice (truncated to its own topk; the batch runs at the largest topk asked). No
timer is involved: while one batch is being searched the next one accumulates, so an idle
server answers at once and a busy one merges concurrent requests into large batches, which
is where BM25/dense retrieval is fast.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import sys
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from searchr1_jax.retrieval.types import Passage, Retriever

DEFAULT_MAX_QUERIES = 8192
DEFAULT_MAX_QUERY_CHARS = 4096
DEFAULT_MAX_TOPK = 100
DEFAULT_MAX_BATCH_QUERIES = 8192
DEFAULT_MAX_BODY_BYTES = 64 << 20  # 8,192 queries of 4,096 characters fit
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future


class MicroBatcher:
    """Merges concurrent `search` calls into one `retriever.search` (see the module docstring)."""

    def __init__(self, retriever: Retriever, max_batch_queries: int):
        self._retriever = retriever
        self._max_batch_queries = max_batch_queries
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")

    def pending(self) -> int:
        """Requests waiting for the next batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.put_nowait(_Pending(queries, topk, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            batch = [carry or await self._queue.get()]
            carry, size = None, len(batch[0].queries)
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if size + len(item.queries) > self._max_batch_queries:
                    carry = item
                    break
                batch.append(item)
                size += len(item.queries)
            queries = [q for item in batch for q in item.queries]
            topk = max(item.topk for item in batch)
            try:
                results = await loop.run_in_executor(self._thread, self._retriever.search, queries, topk)
                if len(results) != len(queries):
                    raise RuntimeError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
            except Exception as err:  # every request of the batch gets the error; the worker keeps going
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            start = 0
            for item in batch:
                rows = results[start : start + len(item.queries)]
                start += len(item.queries)
                if not item.future.done():
                    item.future.set_result([row[: item.topk] for row in rows])

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


def response_json(results: Sequence[Sequence[Passage]], return_scores: bool) -> dict:
    """The original server's response body for `results` (one list of passages per query)."""
    if return_scores:
        rows = [[{"document": {"id": p.id, "contents": p.contents}, "score": p.score} for p in row] for row in results]
    else:
        rows = [[{"id": p.id, "contents": p.contents} for p in row] for row in results]
    return {"result": rows}


def truncate_queries(queries: list[str], max_chars: int) -> tuple[list[str], list[int]]:
    """``(queries each cut to its first max_chars characters, positions of those that were cut)``."""
    cut = [i for i, q in enumerate(queries) if len(q) > max_chars]
    if not cut:
        return queries, cut
    return [q[:max_chars] for q in queries], cut


def validate_request(body: object, *, max_queries: int, max_topk: int, default_topk: int) -> tuple[list[str], int, bool]:
    """Check a decoded ``/retrieve`` body; returns ``(queries, topk, return_scores)``.

    Raises ValueError with a message naming the offending field. Query length is not
    checked here: over-long queries are truncated (:func:`truncate_queries`), not refused.
    """
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object {\"queries\": [...], \"topk\": int, \"return_scores\": bool}")
    unknown = sorted(set(body) - {"queries", "topk", "return_scores"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; expected 'queries', 'topk', 'return_scores'")
    queries = body.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("field 'queries' must be a list of strings")
    if len(queries) > max_queries:
        raise ValueError(f"field 'queries' holds {len(queries)} queries; at most {max_queries} per request")
    topk = body.get("topk")
    if topk is None:
        topk = default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"field 'topk' must be an integer or null, got {json.dumps(topk)}")
    if not 1 <= topk <= max_topk:
        raise ValueError(f"field 'topk' must be between 1 and {max_topk}, got {topk}")
    return_scores = body.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise ValueError(f"field 'return_scores' must be true or false, got {json.dumps(return_scores)}")
    return queries, topk, return_scores


class _BodyError(Exception):
    """A body that cannot be read: `status` and `detail` of the answer."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


async def read_body(request: Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused (`_BodyError`) when it declares or turns out to hold more than
    `max_bytes` (413) or does not arrive within `timeout_s` seconds (408)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _BodyError(413, f"the body has {int(declared)} bytes; at most {max_bytes} are accepted")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _BodyError(413, f"the body has more than {max_bytes} bytes; at most {max_bytes} are accepted")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise _BodyError(408, f"the body did not arrive within {timeout_s:g} s") from None
    except asyncio.CancelledError:  # the server's graceful-shutdown bound ran out while waiting
        raise _BodyError(503, "the server is shutting down") from None
    return b"".join(chunks)


def create_app(
    retriever: Retriever,
    *,
    max_queries: int = DEFAULT_MAX_QUERIES,
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
    max_topk: int = DEFAULT_MAX_TOPK,
    default_topk: int = 3,
    max_batch_queries: int = DEFAULT_MAX_BATCH_QUERIES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    docs: bool = False,
):
    """A FastAPI app serving `retriever` (see the module docstring for the API and limits)."""
    if not 1 <= default_topk <= max_topk:
        raise ValueError(f"default_topk must be between 1 and max_topk={max_topk}, got {default_topk}")
    batcher = MicroBatcher(retriever, max_batch_queries)
    stats = {"truncated_queries": 0}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="searchr1_jax retriever", lifespan=lifespan, **({} if docs else
                  {"docs_url": None, "redoc_url": None, "openapi_url": None}))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue": batcher.pending(), **stats}

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        try:
            raw = await read_body(request, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
        except _BodyError as err:
            log.warning("refused a request from %s: %s", _client(request), err.detail)
            return JSONResponse({"detail": err.detail}, status_code=err.status)
        except ClientDisconnect:
            log.info("client %s disconnected before sending its whole request", _client(request))
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        try:
            body = json.loads(raw)
        except ValueError as err:  # not JSON, not UTF-8, or an integer too long to convert
            return JSONResponse({"detail": f"the body is not valid JSON: {str(err)[:200]}"}, status_code=400)
        except RecursionError:
            return JSONResponse({"detail": "the body nests arrays or objects too deeply"}, status_code=400)
        try:
            queries, topk, return_scores = validate_request(
                body, max_queries=max_queries, max_topk=max_topk, default_topk=default_topk
            )
        except ValueError as err:
            return JSONResponse({"detail": str(err)}, status_code=422)
        lengths = [len(q) for q in queries]
        queries, cut = truncate_queries(queries, max_query_chars)
        if cut:
            stats["truncated_queries"] += len(cut)
            log.warning(
                "truncated %d of %d queries to %d characters (queries%s: %s characters); %d truncated so far",
                len(cut), len(queries), max_query_chars, cut[:5], [lengths[i] for i in cut[:5]], stats["truncated_queries"],
            )
        if not queries:
            return JSONResponse({"result": []})
        try:
            results = await batcher.search(queries, topk)
        except Exception as err:
            return JSONResponse({"detail": f"retrieval failed: {type(err).__name__}: {err}"}, status_code=500)
        body = response_json(results, return_scores)
        if cut:  # extra key, only then: the original's client reads "result" alone
            body["truncated"] = cut
        return JSONResponse(body)

    return app


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all
    arrived `timeout_s` seconds after it opened or after its last response (slow-header
    clients would otherwise hold it forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                log.info("closed a connection from %s: no complete request headers within %g s",
                         "%s:%d" % self.client if self.client else "?", timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


def serve(app, *, host: str, port: int, header_timeout_s: float, shutdown_timeout_s: float) -> None:
    """Run `app` under uvicorn until SIGTERM/SIGINT; returns (exit 0) after a graceful stop
    bounded by `shutdown_timeout_s`."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has stopped (exit -15); a requested stop
            # that completed is a clean exit.
            self._captured_signals.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            http=_header_timeout_protocol(header_timeout_s),
                            timeout_graceful_shutdown=max(1, round(shutdown_timeout_s)))
    Server(config).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m searchr1_jax.retrieval.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index directory (built by searchr1_jax.retrieval.build_index, or a Pyserini Lucene index)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=3, help="passages per query when a request's topk is null")
    parser.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES, help="queries allowed in one request")
    parser.add_argument("--max-query-chars", type=int, default=DEFAULT_MAX_QUERY_CHARS,
                        help="longer queries are cut to this many characters (logged, counted on /health)")
    parser.add_argument("--max-topk", type=int, default=DEFAULT_MAX_TOPK, help="largest topk a request may ask")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a connection may take to send its request headers")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a request may take to send its body (else 408)")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                        help="on SIGTERM, seconds in-flight requests get before the server exits")
    parser.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from searchr1_jax.retrieval.index import load_retriever

    try:
        retriever = load_retriever(args.index)
        retriever.search(["warm up"], 1)  # compile / page in before the first client waits on it
        app = create_app(
            retriever, max_queries=args.max_queries, max_query_chars=args.max_query_chars, max_topk=args.max_topk,
            default_topk=args.topk, max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
            docs=args.docs,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:
        print(f"server: error: {err}", file=sys.stderr)
        return 1
    print(f"serving {args.index} at http://{args.host}:{args.port}/retrieve", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, header_timeout_s=args.header_timeout,
          shutdown_timeout_s=args.shutdown_timeout)
    print("server: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
