"""BM25: hand-computed scores, parity with bm25s, the numba kernel against a NumPy reference."""
import collections
import json
import math

import numpy as np
import pytest

from searchr1_jax.retrieval import bm25
from searchr1_jax.retrieval.bm25 import Analyzer, Bm25Retriever, TermIds, build_bm25_index, passage_text
from searchr1_jax.retrieval.corpus import CorpusError, iter_passages
from searchr1_jax.retrieval.docstore import read_meta

K1, B = 0.9, 0.4


def write_corpus(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bm25_tiny")
    corpus = write_corpus(
        tmp / "c.jsonl",
        [
            {"id": "d0", "contents": '"Cats"\ncat cat dog'},
            {"id": "d1", "title": "Dogs", "text": "dog bird"},
            {"id": "d2", "contents": '"Fish"\nfish'},
        ],
    )
    build_bm25_index(corpus, tmp / "index", show_progress=False)
    return tmp / "index"


WORDS = "apple banana cherry grape lemon mango olive peach plum berry melon kiwi".split()


@pytest.fixture(scope="module")
def random_corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        words = rng.choice(WORDS, size=rng.integers(0, 12), p=np.linspace(2, 0.2, len(WORDS)) / np.linspace(2, 0.2, len(WORDS)).sum())
        rows.append({"id": f"p{i}", "title": "", "text": " ".join(words)})
    tmp = tmp_path_factory.mktemp("bm25_random")
    corpus = write_corpus(tmp / "c.jsonl", rows)
    build_bm25_index(corpus, tmp / "index", show_progress=False)
    queries = [" ".join(rng.choice(WORDS, size=rng.integers(1, 5))) for _ in range(40)] + ["zebra", "the of", ""]
    return corpus, tmp / "index", queries


def lucene_idf(df, n):
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def test_analyzer_lowercases_drops_stopwords_and_stems():
    assert Analyzer().terms("The Running CATS of a Dog's x") == ["run", "cat", "dog"]


def test_scores_match_hand_computed_lucene_bm25(tiny_index):
    # Terms: d0 = cat cat cat dog (4), d1 = dog dog bird (3), d2 = fish fish (2); avgdl = 3.
    retriever = Bm25Retriever.load(tiny_index, n_threads=1)
    norm = {4: K1 * (1 - B + B * 4 / 3), 3: K1 * (1 - B + B * 3 / 3)}
    (cat,), (dog,) = retriever.search(["cats"], 3), retriever.search(["dogs"], 3)
    assert [p.id for p in cat] == ["d0"]
    assert cat[0].score == pytest.approx(lucene_idf(1, 3) * 3 / (3 + norm[4]), rel=1e-6)
    assert cat[0].title == "Cats" and cat[0].text == "cat cat dog"
    assert [p.id for p in dog] == ["d1", "d0"]
    assert dog[0].score == pytest.approx(lucene_idf(2, 3) * 2 / (2 + norm[3]), rel=1e-6)
    assert dog[1].score == pytest.approx(lucene_idf(2, 3) * 1 / (1 + norm[4]), rel=1e-6)
    (both,) = retriever.search(["cat bird"], 1)
    assert both[0].id == "d0"


def test_edge_cases(tiny_index):
    retriever = Bm25Retriever.load(tiny_index, n_threads=2)
    assert retriever.search([], 3) == []
    assert retriever.search(["zebra", "the of", ""], 3) == [[], [], []]  # no indexed term: no passage
    (everything,) = retriever.search(["cat dog bird fish"], 50)  # topk above the corpus size
    assert sorted(p.id for p in everything) == ["d0", "d1", "d2"]
    assert [p.score for p in everything] == sorted((p.score for p in everything), reverse=True)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        retriever.search(["cat"], 0)
    meta = read_meta(tiny_index)
    assert meta["method"] == "bm25" and meta["num_passages"] == 3 and meta["k1"] == K1 and meta["b"] == B


@pytest.mark.parametrize("shard_lines", [None, 70])  # one shard; five shards (300 lines)
def test_weights_match_bm25s_index(random_corpus, tmp_path, shard_lines):
    """The streaming sharded build writes, term for term, the matrix bm25s' own indexer makes."""
    import bm25s

    corpus, _, _ = random_corpus
    term_ids = TermIds(Analyzer())
    docs = [term_ids.ids(passage_text(p)) for p in iter_passages(corpus)]
    vocab = dict(term_ids.vocab)
    vocab[""] = len(vocab)
    reference = bm25s.BM25(k1=K1, b=B, method="lucene")
    reference.index((docs, vocab), create_empty_token=False, show_progress=False)

    meta = build_bm25_index(corpus, tmp_path / "index", shard_lines=shard_lines, show_progress=False)
    assert meta["shards"] == (1 if shard_lines is None else 5)
    ours = bm25s.BM25.load(tmp_path / "index" / "bm25s", mmap=True)  # bm25s reads our files
    assert set(ours.vocab_dict) == set(vocab)
    assert ours.vocab_dict[""] == 0 and sorted(ours.vocab_dict, key=ours.vocab_dict.get) == sorted(vocab)
    ref, got = reference.scores, ours.scores
    term_max = np.load(tmp_path / "index" / "term_max.npy")
    for term, ref_id in vocab.items():
        our_id = ours.vocab_dict[term]
        ref_slice = slice(ref["indptr"][ref_id], ref["indptr"][ref_id + 1])
        our_slice = slice(got["indptr"][our_id], got["indptr"][our_id + 1])
        np.testing.assert_array_equal(got["indices"][our_slice], ref["indices"][ref_slice])
        np.testing.assert_allclose(got["data"][our_slice], ref["data"][ref_slice], rtol=1e-6)
        assert term_max[our_id] == (got["data"][our_slice].max() if our_slice.stop > our_slice.start else 0.0)


def reference_topk(corpus, queries, k):
    """Brute-force Lucene BM25 over the analysed corpus; top k as (id, score), ties by row.

    Weights are stored as float32 in the index and summed exactly (float64), so the
    reference rounds each weight to float32 and sums in float64.
    """
    analyzer = Analyzer()
    docs = [collections.Counter(analyzer.terms(passage_text(p))) for p in iter_passages(corpus)]
    ids = [p.id for p in iter_passages(corpus)]
    lengths = np.array([sum(d.values()) for d in docs], float)
    df = collections.Counter(t for d in docs for t in d)
    out = []
    for query in queries:
        scores = np.zeros(len(docs))
        for term in analyzer.terms(query):
            idf = lucene_idf(df[term], len(docs)) if df[term] else 0.0
            tf = np.array([d[term] for d in docs], float)
            weights = idf * tf / (tf + K1 * (1 - B + B * lengths / lengths.mean()))
            scores += weights.astype(np.float32).astype(np.float64)
        order = sorted((i for i in range(len(docs)) if scores[i] > 0), key=lambda i: (-scores[i], i))[:k]
        out.append([(ids[i], scores[i]) for i in order])
    return out


@pytest.mark.parametrize("n_threads, topk", [(1, 5), (2, 5), (2, 1), (1, 40)])
def test_kernel_matches_brute_force(random_corpus, n_threads, topk):
    corpus, index, queries = random_corpus
    got = Bm25Retriever.load(index, n_threads=n_threads).search(queries, topk)
    want = reference_topk(corpus, queries, topk)
    for query, row, expected in zip(queries, got, want):
        assert [p.id for p in row] == [i for i, _ in expected], query
        np.testing.assert_allclose([p.score for p in row], [s for _, s in expected], rtol=1e-5)


def test_numpy_fallback_finds_the_same_passages(random_corpus, monkeypatch):
    _, index, queries = random_corpus
    with_kernel = Bm25Retriever.load(index).search(queries, 5)
    monkeypatch.setattr(bm25, "njit", None)  # as if numba were not installed
    without = Bm25Retriever.load(index).search(queries, 5)
    for a, b in zip(with_kernel, without):
        assert {p.id: round(p.score, 4) for p in a} == {p.id: round(p.score, 4) for p in b}


def test_build_refuses_bad_corpus_and_existing_index(tmp_path, tiny_index):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "contents": "x"}) + "\n" + '{"id": 2}\n')
    with pytest.raises(CorpusError, match=f"{bad}:2"):
        build_bm25_index(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no staging directory left
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no passages"):
        build_bm25_index(empty, tmp_path / "out", show_progress=False)
    with pytest.raises(FileExistsError):
        build_bm25_index(empty, tiny_index, show_progress=False)


def test_rebuild_with_overwrite(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", [{"id": "x", "title": "T", "text": "alpha"}])
    build_bm25_index(corpus, tmp_path / "index", show_progress=False)
    write_corpus(corpus, [{"id": "y", "title": "T", "text": "beta"}, {"id": "z", "title": "T", "text": "gamma"}])
    build_bm25_index(corpus, tmp_path / "index", show_progress=False, overwrite=True)
    retriever = Bm25Retriever.load(tmp_path / "index")
    assert len(retriever) == 2
    assert [[p.id for p in row] for row in retriever.search(["alpha", "beta"], 3)] == [[], ["y"]]


def test_term_maxima_handles_empty_columns():
    data = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    indptr = np.array([0, 0, 2, 2, 4, 4])  # columns 0, 2 and 4 are empty
    np.testing.assert_array_equal(bm25.term_maxima(data, indptr), [0.0, 2.0, 0.0, 3.0, 0.0])


def test_index_without_term_max_file_gives_the_same_results(random_corpus, tmp_path):
    """Indexes built before term_max.npy existed compute the column maxima on load."""
    import shutil

    _, index, queries = random_corpus
    shutil.copytree(index, tmp_path / "old")
    (tmp_path / "old" / bm25.TERM_MAX_FILE).unlink()
    assert Bm25Retriever.load(tmp_path / "old").search(queries, 5) == Bm25Retriever.load(index).search(queries, 5)
