"""The bench's catalog-scale search part runs and reports per-job times (figures are the bench's, not checked here)."""

from ops.bench_embed import search_rows


def test_search_rows_time_a_batched_search_against_a_search_per_job():
    rows = search_rows([1, 3], reps=1, catalog=2_000, say=lambda line: None)
    assert [row.batch for row in rows] == [1, 3]
    for row in rows:
        assert 0 < row.batched_ms < row.per_job_ms  # the per-job figure adds N searches to the batch's one
