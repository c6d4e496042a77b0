"""HttpRetriever against a real uvicorn server on 127.0.0.1, and a 16-client load test."""
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.client import HttpRetriever, RetrieverError, RetrieverUnavailableError, parse_response
from searchr1_jax.retrieval.server import create_app
from searchr1_jax.retrieval.types import Passage

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    tmp = tmp_path_factory.mktemp("http")
    rows = [
        {"id": f"p{i}", "title": f"Title {i}", "text": " ".join(rng.choice(WORDS, size=rng.integers(3, 15)))}
        for i in range(500)
    ]
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_bm25_index(tmp / "c.jsonl", tmp / "index", show_progress=False)
    return tmp / "index"


@pytest.fixture(scope="module")
def retriever(index_dir):
    return Bm25Retriever.load(index_dir)


class Counting:
    """Wraps a retriever: records the queries of each search; fails the first `failures` calls."""

    def __init__(self, inner, failures=0):
        self.inner, self.failures, self.calls = inner, failures, []

    def search(self, queries, topk):
        self.calls.append(list(queries))
        if len(self.calls) <= self.failures:
            raise RuntimeError("transient failure")
        return self.inner.search(queries, topk)


@contextlib.contextmanager
def serve(app):
    """Run `app` under uvicorn on a free loopback port; yields the /retrieve URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/retrieve"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(index_dir, *args):
    """`python -m searchr1_jax.retrieval.server` in a child process; yields the /retrieve URL."""
    port = free_port()
    command = [sys.executable, "-m", "searchr1_jax.retrieval.server", "--index", str(index_dir), "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"server exited: {process.stdout.read()}"
            assert time.monotonic() < deadline, "server did not come up in 60 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/retrieve"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_client_matches_in_process_results(retriever):
    queries = ["alpha bravo", "kilo", "nothing here", "papa oscar mike"]
    with serve(create_app(retriever)) as url, HttpRetriever(url) as client:
        assert client.search(queries, 4) == retriever.search(queries, 4)  # ids, titles, texts, scores
        assert client.search([], 3) == []


def test_client_counts_queries_the_server_truncated(retriever):
    with serve(create_app(retriever, max_query_chars=16)) as url, HttpRetriever(url) as client:
        long_query = "kilo " + "z" * 30
        assert client.search(["kilo", long_query], 2) == retriever.search(["kilo", long_query[:16]], 2)
        assert client.truncated_queries == 1
        client.search([long_query, long_query + "y", "kilo"], 2)
        assert client.truncated_queries == 3


def test_cache_sends_only_unseen_queries(retriever):
    counting = Counting(retriever)
    with serve(create_app(counting)) as url, HttpRetriever(url, cache_size=2) as client:
        first = client.search(["alpha", "bravo", "alpha"], 3)
        assert counting.calls == [["alpha", "bravo"]]  # one request, duplicates sent once
        assert first[0] == first[2] == retriever.search(["alpha"], 3)[0]
        assert client.search(["bravo", "alpha"], 3) == retriever.search(["bravo", "alpha"], 3)
        assert len(counting.calls) == 1  # both cached
        client.search(["charlie"], 3)  # evicts the least recently used: "bravo"
        client.search(["alpha", "bravo"], 3)
        assert counting.calls[1:] == [["charlie"], ["bravo"]]
        client.search(["alpha"], 1)  # another topk is another entry
        assert counting.calls[-1] == ["alpha"]


def test_unreachable_server_error_names_url():
    url = f"http://127.0.0.1:{free_port()}/retrieve"
    client = HttpRetriever(url, timeout=2, retries=2, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(RetrieverUnavailableError) as err:
        client.search(["alpha"], 3)
    assert url in str(err.value) and "after 3 attempts" in str(err.value)
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05 then 0.1


def test_5xx_is_retried_4xx_is_not(retriever):
    flaky = Counting(retriever, failures=1)
    with serve(create_app(flaky)) as url:
        with HttpRetriever(url, retries=2, backoff=0.01) as client:
            assert client.search(["alpha"], 2) == retriever.search(["alpha"], 2)
            assert len(flaky.calls) == 2
            with pytest.raises(RetrieverError, match="HTTP 422") as err:
                client.search(["alpha"], 0)
            assert url in str(err.value) and len(flaky.calls) == 2
        flaky.failures = 10
        with HttpRetriever(url, retries=1, backoff=0.01) as client, pytest.raises(RetrieverError, match="HTTP 500"):
            client.search(["bravo"], 2)


def test_parse_response_both_shapes_and_errors():
    with_scores = {"result": [[{"document": {"id": "1", "contents": '"T"\nbody'}, "score": 2.5}], []]}
    assert parse_response(with_scores, 2, "u") == [[Passage("1", "T", "body", 2.5)], []]
    without = {"result": [[{"id": "1", "contents": '"T"\nbody'}]]}
    assert parse_response(without, 1, "u") == [[Passage("1", "T", "body", 0.0)]]
    with pytest.raises(RetrieverError, match=r"http://x/retrieve: expected .* for 2 queries"):
        parse_response(without, 2, "http://x/retrieve")
    with pytest.raises(RetrieverError, match=r"http://x/retrieve: result\[0\]\[0\] is not a passage"):
        parse_response({"result": [[{"document": {"id": "1"}, "score": 1}]]}, 1, "http://x/retrieve")


def test_load_16_clients_x_200_requests(index_dir, retriever, capsys):
    """The CLI server in its own process; 16 client threads x 200 requests of one query each."""
    clients, requests_each = 16, 200
    rng = np.random.default_rng(2)
    queries = [" ".join(rng.choice(WORDS, size=3)) for _ in range(64)]
    expected = dict(zip(queries, retriever.search(queries, 3)))
    latencies, errors = [], []
    lock = threading.Lock()

    def client_loop(url, seed):
        local_rng = np.random.default_rng(seed)
        with HttpRetriever(url, timeout=30, retries=0) as client:
            for _ in range(requests_each):
                query = queries[local_rng.integers(len(queries))]
                start = time.perf_counter()
                try:
                    (got,) = client.search([query], 3)
                    ok = got == expected[query]
                except Exception as err:  # counted, reported below
                    ok = False
                    got = err
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if not ok:
                        errors.append(got)

    with server_process(index_dir, "--topk", "3") as url:
        threads = [threading.Thread(target=client_loop, args=(url, i)) for i in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        wall = time.perf_counter() - start
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(latencies) == clients * requests_each
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    with capsys.disabled():
        print(
            f"\nload test: {clients} clients x {requests_each} requests, 0 errors, "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(latencies) / wall:.0f} requests/s"
        )
