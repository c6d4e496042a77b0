"""The retriever a command was given, a built index or a server's URL, checked with one
query before anything is compiled, so a dead URL is found in seconds and named."""
from __future__ import annotations

import contextlib
import os

from searchr1_jax.retrieval.client import HttpRetriever, RetrieverError, RetrieverUnavailableError
from searchr1_jax.retrieval.types import Retriever

PROBE_QUERY = "retriever start-up check"


def open_retriever(index_dir: str | None, url: str | None, *, timeout_s: float = 30.0, max_retries: int = 3,
                   max_wait_s: float = 60.0, index_name: str = "--index",
                   url_name: str = "--retriever-url") -> Retriever:
    """The in-process index of `index_dir` or the HTTP client of `url` (exactly one given),
    after one probe query. `index_name` / `url_name` are what errors call the two settings
    (a flag, or a config field such as `config.retriever.url`). The probe fails fast (three
    quick retries); later searches retry `max_retries` times within `max_wait_s` seconds.

    Raises ValueError (none or both given), FileNotFoundError (no such index directory) or
    RetrieverError (the retriever does not answer), each naming the setting.
    """
    if bool(index_dir) == bool(url):
        raise ValueError(f"give exactly one of {index_name} (a built index) or {url_name} (a /retrieve server)")
    if url:
        retriever, name = HttpRetriever(url, timeout=timeout_s, retries=max_retries, max_wait_s=max_wait_s), url_name
    else:
        if not os.path.isdir(index_dir):
            raise FileNotFoundError(f"{index_name}: index directory {index_dir!r} does not exist (build one with "
                                    "python -m searchr1_jax.retrieval.build_index)")
        from searchr1_jax.retrieval.index import load_retriever

        retriever, name = load_retriever(index_dir), index_name
    probe(retriever, name)
    return retriever


def probe(retriever: Retriever, name: str) -> None:
    """One query through `retriever`; a RetrieverError naming `name` when it fails."""
    quick = getattr(retriever, "quick_retries", None)
    try:
        with quick() if quick else contextlib.nullcontext():
            retriever.search([PROBE_QUERY], 1)
    except RetrieverUnavailableError as e:
        raise RetrieverUnavailableError(f"{name}: {e} (is the server started? python -m "
                                        "searchr1_jax.retrieval.server --index DIR --port PORT)") from None
    except RetrieverError as e:
        raise RetrieverError(f"{name}: {e}") from None
