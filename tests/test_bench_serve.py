"""bench/serve.py ((g) server batching throughput) with tiny numbers: two real server processes, 2 clients."""

from bench import serve


def test_serve_bench_measures_throughput_and_latency():
    seq, rows = serve.measure(concurrency=(2,), total=4, steps=4, max_batch=2, log=lambda m: None)
    assert [r.clients for r in rows] == [2]
    for r in [seq, *rows]:
        assert r.statuses == {200: 4}, r.statuses  # every request answered 200 with its one image
        assert r.images_per_s > 0
        assert len(r.latencies) == 4 and 0 < r.p50 <= r.p95
    t = serve.table(seq, rows, 4, serve.SIZE, 2, serve.WINDOW_MS, "0 0 0", "0 0 0").markdown()
    assert "### (g) Server batching throughput" in t and "| 2 clients | 4 |" in t
