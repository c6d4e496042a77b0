"""The streaming sharded BM25 build: shard boundaries, resuming after a crash to the same
index, errors naming the corpus line, and (slow) a ~200k-passage build that stays within a
small memory setting."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from searchr1_jax.retrieval import bm25_build
from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.corpus import CorpusError
from searchr1_jax.retrieval.docstore import DocStore

REPO = Path(__file__).resolve().parents[1]
WORDS = "apple banana cherry grape lemon mango olive peach plum berry melon kiwi".split()


def write_rows(path, rows, blank_every=0):
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row))
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(1)
    rows = [{"id": f"p{i}", "contents": f'"T{i}"\n' + " ".join(rng.choice(WORDS, size=rng.integers(1, 10)))} for i in range(300)]
    return write_rows(tmp_path_factory.mktemp("shards") / "c.jsonl", rows, blank_every=37)


@pytest.mark.parametrize("text, every", [(b"", 2), (b"a\nb\nc\n", 2), (b"a\nb\nc", 2), (b"a\n\nb\nc\nd\n", 1), (b"a\nb\n", 5)])
def test_line_offsets_cut_every_n_lines(tmp_path, text, every):
    path = tmp_path / "f"
    path.write_bytes(text)
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    expected = starts[:-1][::every] + [len(text)] if text else [0]
    assert bm25_build.line_offsets(str(path), every) == expected


def index_files(index):
    """Every file of an index directory but meta.json (which holds times), as bytes."""
    out = {}
    for root, _, names in os.walk(index):
        for name in names:
            if name != "meta.json":
                out[os.path.relpath(os.path.join(root, name), index)] = Path(root, name).read_bytes()
    return out


def test_interrupted_build_resumes_to_the_same_index(corpus, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    meta = build_bm25_index(corpus, reference, shard_lines=70, show_progress=False)
    assert meta["shards"] == 5 and meta["num_passages"] == 300  # 308 lines (8 blank) in shards of 70

    real_save = bm25_build._save_npy

    def crash_in_shard_2(directory, name, array):
        if "00002" in directory and name == "tf.npy":
            raise KeyboardInterrupt  # e.g. Ctrl-C, half-way through writing shard 2
        real_save(directory, name, array)

    monkeypatch.setattr(bm25_build, "_save_npy", crash_in_shard_2)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        build_bm25_index(corpus, out, shard_lines=70, show_progress=False)
    staging = Path(bm25_build.staging_dir(out))
    assert sorted(p.name for p in (staging / "shards").iterdir()) == ["00000", "00001", "00002.tmp"]
    assert not out.exists()

    monkeypatch.setattr(bm25_build, "_save_npy", real_save)
    read = []
    real_read = bm25_build._read_lines
    monkeypatch.setattr(bm25_build, "_read_lines", lambda path, start, end, first: read.append(first) or real_read(path, start, end, first))
    build_bm25_index(corpus, out, shard_lines=70, show_progress=False)
    assert read == [141, 211, 281]  # shards 0 and 1 (lines 1-140) were kept, not re-read
    assert not staging.exists()
    assert index_files(out) == index_files(reference)
    queries = [" ".join(WORDS[i:i + 3]) for i in range(0, 12, 3)]
    assert Bm25Retriever.load(out).search(queries, 5) == Bm25Retriever.load(reference).search(queries, 5)


def test_resume_refuses_other_settings(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(bm25_build, "merge_shards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_bm25_index(corpus, tmp_path / "index", shard_lines=70, show_progress=False)
    with pytest.raises(ValueError, match=r"different settings \(shard_lines: was 70, now 50\); delete it"):
        build_bm25_index(corpus, tmp_path / "index", shard_lines=50, show_progress=False)
    assert Path(bm25_build.staging_dir(tmp_path / "index")).is_dir()  # kept: the user decides


def test_bad_line_in_a_later_shard_names_its_line(tmp_path):
    rows = [{"id": str(i), "contents": f"word{i} apple"} for i in range(200)]
    path = write_rows(tmp_path / "c.jsonl", rows)
    lines = path.read_text().splitlines()
    lines[149] = '{"id": 150}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=rf"{path}:150: missing field"):
        build_bm25_index(path, tmp_path / "index", shard_lines=60, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # staging removed: the corpus must change


def test_memory_setting_sizes_the_shards(corpus):
    pairs = bm25_build.estimate_pairs_per_passage(str(corpus))
    assert 1 <= pairs <= 10
    small, large = (bm25_build.shard_lines_for(gb * 2**30, 1, 63.0) for gb in (1, 4))
    assert large > 4 * small > 0  # the fixed base is paid once
    assert bm25_build.shard_lines_for(2 * 2**30, 2, 63.0) < bm25_build.shard_lines_for(2 * 2**30, 1, 63.0)
    with pytest.raises(ValueError, match="memory_gb=0.5 is too small for 2 worker"):
        bm25_build.shard_lines_for(0.5 * 2**30, 2, 63.0)


def test_two_workers_build_the_same_index(corpus, tmp_path):
    one = build_bm25_index(corpus, tmp_path / "one", shard_lines=100, show_progress=False)
    two = build_bm25_index(corpus, tmp_path / "two", shard_lines=100, workers=2, show_progress=False)
    assert one["shards"] == two["shards"] == 4
    assert index_files(tmp_path / "one") == index_files(tmp_path / "two")
    assert len(DocStore.open(tmp_path / "two")) == 300


BOUNDED_BUILD = """
import json, resource, sys
from searchr1_jax.retrieval.bm25_build import build_bm25_index
meta = build_bm25_index(sys.argv[1], sys.argv[2], memory_gb=float(sys.argv[3]), show_progress=False)
print(json.dumps({"max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "meta": meta}))
"""


@pytest.mark.slow
def test_200k_passage_build_stays_within_a_small_memory_setting(tmp_path):
    """~200k wiki-sized passages (100 Zipf words, 12.5M postings), memory_gb=0.75: the
    build must shard and its peak RSS (the kernel's high-water mark) stay below 0.75 GiB."""
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}x" for i in range(50_000)], dtype=object)
    cdf = np.cumsum(np.arange(1, len(vocab) + 1) ** -1.07)
    cdf /= cdf[-1]
    num = 200_000
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as out:
        for start in range(0, num, 10_000):
            words = vocab[np.searchsorted(cdf, rng.random((10_000, 100)))]
            out.writelines(json.dumps({"id": str(start + i), "contents": f'"T{start + i}"\n' + " ".join(row)}) + "\n"
                           for i, row in enumerate(words))
    memory_gb = 0.75
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", BOUNDED_BUILD, str(tmp_path / "c.jsonl"), str(tmp_path / "index"), str(memory_gb)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = result["meta"]
    assert meta["num_passages"] == num and meta["shards"] >= 3
    assert result["max_rss"] < memory_gb * 2**30, f"peak RSS {result['max_rss'] / 2**30:.2f} GiB"
    # The index answers: a passage's own rare words find it.
    retriever = Bm25Retriever.load(tmp_path / "index")
    line = json.loads(Path(tmp_path / "c.jsonl").open().readlines()[123_456])
    rare = sorted(set(line["contents"].split("\n")[1].split()), key=lambda w: -int(w[1:-1]))[:4]
    assert retriever.search([" ".join(rare)], 3)[0][0].id == "123456"
