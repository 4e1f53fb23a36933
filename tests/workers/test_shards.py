import numpy as np
import pytest

from workers.shards import Shard, ShardSet


def unit(rng, n, dim=16):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_shard_set_search_equals_brute_force_over_all_shards():
    rng = np.random.default_rng(0)
    shards = ShardSet(4, 16)
    vectors, ids = unit(rng, 400), np.arange(1000, 1400)
    for shard in range(4):
        shards.shards[shard].upsert(ids[shard::4], vectors[shard::4])
    queries = unit(rng, 5)
    scores, found = shards.search(queries, 10)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected, axis=1), rtol=1e-5)


def test_upsert_replaces_and_remove_deletes():
    rng = np.random.default_rng(1)
    shard = Shard(16)
    first, second = unit(rng, 1), unit(rng, 1)
    shard.upsert(np.array([7]), first)
    shard.upsert(np.array([7]), second)
    assert shard.ntotal == 1
    scores, ids = shard.search(second, 1)
    assert ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert shard.remove(np.array([7, 8])) == 1
    assert shard.ntotal == 0


def test_fewer_vectors_than_k_pads_with_minus_one():
    rng = np.random.default_rng(2)
    shards = ShardSet(2, 16)
    shards.shards[1].upsert(np.array([5]), unit(rng, 1))
    scores, ids = shards.search(unit(rng, 1), 3)
    assert ids.tolist() == [[5, -1, -1]]
    assert scores[0, 1] == -1.0


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected \(1, 16\)"):
        Shard(16).upsert(np.array([1]), np.zeros((1, 8), np.float32))
