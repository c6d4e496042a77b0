"""The retrieval server against clients that misbehave: huge or never-ending bodies, slow
headers, stalled clients at shutdown, undecodable JSON, disconnects; docs endpoints off."""
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.server import create_app

ROWS = [{"id": "d0", "contents": '"Cats"\ncat cat dog'}, {"id": "d1", "contents": '"Fish"\nfish'}]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    build_bm25_index(tmp / "c.jsonl", tmp / "index", show_progress=False)
    return tmp / "index"


def _post(app, content, headers=None, path="/retrieve", method="POST"):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, content=content, headers=headers)

    return asyncio.run(run())


def test_undecodable_json_is_400_not_500(index):
    app = create_app(Bm25Retriever.load(index, n_threads=1))
    huge_int = b'{"queries": ["cat"], "topk": ' + b"9" * 5000 + b"}"
    deep = b'{"queries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body, detail in ((huge_int, "not valid JSON"), (deep, "nests arrays or objects too deeply"),
                         (b"\xff\xfe", "not valid JSON")):
        response = _post(app, body)
        assert response.status_code == 400 and detail in response.json()["detail"]
    assert _post(app, json.dumps({"queries": ["cat"], "topk": 1})).status_code == 200


def test_a_body_over_the_limit_is_413_declared_or_streamed(index):
    app = create_app(Bm25Retriever.load(index, n_threads=1), max_body_bytes=1 << 20)
    big = b'{"queries": ["' + b"a" * (50 << 20) + b'"]}'
    response = _post(app, big)
    assert response.status_code == 413 and "at most 1048576" in response.json()["detail"]

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(50):
            yield b"a" * (1 << 20)

    assert _post(app, chunks()).status_code == 413


def test_docs_endpoints_are_off_unless_asked(index):
    retriever = Bm25Retriever.load(index, n_threads=1)
    off, on = create_app(retriever), create_app(retriever, docs=True)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert _post(off, None, path=path, method="GET").status_code == 404
        assert _post(on, None, path=path, method="GET").status_code == 200


@pytest.fixture
def server(index):
    """A real server (subprocess) with short timeouts; yields (port, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "searchr1_jax.retrieval.server", "--index", str(index),
                             "--port", str(port), "--header-timeout", "2", "--body-timeout", "3",
                             "--shutdown-timeout", "2", "--max-body-bytes", str(1 << 20)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _partial(port, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(data)
    return sock


def test_slow_clients_are_cut_off_and_sigterm_exits_0_promptly(server):
    port, proc = server
    # Headers that never finish: the connection is closed after --header-timeout.
    slow_headers = _partial(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
    slow_headers.settimeout(10)
    started = time.monotonic()
    assert slow_headers.recv(1024) == b""
    assert time.monotonic() - started < 8
    # A body that stops half-way: 408 after --body-timeout.
    slow_body = _partial(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"que")
    slow_body.settimeout(10)
    assert b" 408 " in slow_body.recv(1024).split(b"\r\n")[0]
    # A 50 MB body announced: 413 without reading it.
    response = httpx.post(f"http://127.0.0.1:{port}/retrieve", content=b"x" * (50 << 20), timeout=30)
    assert response.status_code == 413
    # A client that leaves mid-body: one log line, no traceback.
    _partial(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").close()
    time.sleep(1)
    # SIGTERM while a client stalls mid-body: out within 10 s, exit code 0.
    stalled = _partial(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 0, err[-3000:]
    stalled.close()
    assert "Traceback" not in err, err[-3000:]
    assert "disconnected before sending its whole request" in err
    assert "no complete request headers within 2 s" in err
