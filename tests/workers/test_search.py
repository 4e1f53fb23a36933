"""The worker's search job with options, on real PostgreSQL and Redis and the real model:
filters, category and exclusions are exact; crop, image URLs and "more like this" work."""

from __future__ import annotations

import io
import threading
from collections import Counter

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from ops.publish import read_catalog
from schemas.api import Box, Category, Filters, YearRange
from schemas.jobs import new_job_id
from schemas.settings import WorkerSettings
from schemas.tables import products
from schemas.tasks import EmbedTask, SearchTask
from tests.conftest import SAMPLE, serve_photos
from workers import catalog
from workers.catalog import Upsert
from workers.decode import decode, decode_reduced
from workers.embed import DECODE_MIN_PX
from workers.fetch import Fetcher
from workers.indexer import thumbnail
from workers.segment import Segmenter
from workers.tasks import Runtime

ID_OFFSET = 6_000_000  # apart from the ids of the indexer (9M), recovery (8M), shutdown (7M) and end-to-end tests
MODEL = "test-search"  # its own model version, so the replica holds only these products


@pytest.fixture(scope="module")
def indexed(engine, embedder):
    """80 sample products with real embeddings in Postgres; yields ``{id: (event, vector)}``."""
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images", version=1)
    assert not errors
    events = [e.model_copy(update={"product_id": e.product_id + ID_OFFSET}) for e in events[::15]]
    pixels = [decode(e.image.decoded(), 1 << 24) for e in events]
    vectors = embedder.embed([p for p, _ in Segmenter().crop_all(pixels)])  # as the indexer does
    with engine.begin() as conn:
        catalog.write_upserts(conn, [Upsert(e, e.product_id % 4, v, thumbnail(p, 64))
                                     for e, v, p in zip(events, vectors, pixels)], MODEL)
    yield {e.product_id: (e, v) for e, v in zip(events, vectors)}
    with engine.begin() as conn:
        conn.execute(sa.delete(products).where(products.c.id.in_([e.product_id for e in events])))


@pytest.fixture(scope="module")
def runtime(settings, embedder, indexed):
    wsettings = WorkerSettings(**{**settings.model_dump(), "model_version": MODEL, "fetch_allow_private": True})
    rt = Runtime(wsettings)
    rt.embedder = embedder  # loaded once per session; same weights, tagged MODEL here
    rt.embedder.model_version, original = MODEL, embedder.model_version
    rt.fetcher = Fetcher(wsettings)
    for partition in range(wsettings.partitions):  # from Postgres; these tests need no changelog
        rt.replica.rebuild(partition)
    assert rt.replica.shards.ntotal == len(indexed)
    yield rt
    rt.embedder.model_version = original
    rt.fetcher.close()
    rt.engine.dispose()


def run(rt: Runtime, image: bytes | None = None, task=SearchTask, **options) -> dict:
    job_id = new_job_id()
    rt.store.create(job_id, image)
    if task is SearchTask:
        rt.search(SearchTask(job_id=job_id, **{"k": 5, **options}))
    else:
        rt.embed(EmbedTask(job_id=job_id, **options))
    return rt.store.get(job_id).model_dump(mode="json")


def photo(product_id: int) -> bytes:
    return (SAMPLE / "images" / f"{product_id - ID_OFFSET}.jpg").read_bytes()


def brute_force(indexed, query: np.ndarray, k: int, keep) -> list[int]:
    ids = [i for i, (event, _) in indexed.items() if keep(event)]
    sims = np.array([float(indexed[i][1] @ query) for i in ids])
    return [ids[j] for j in np.argsort(-sims, kind="stable")[:k]]


def test_a_rare_filter_still_fills_k_exactly(runtime, indexed):
    counts = Counter(e.article_type for e, _ in indexed.values())
    article, n = next((a, n) for a, n in counts.most_common() if 6 <= n <= 15)  # a few % of the catalog
    query_id = next(i for i, (e, _) in indexed.items() if e.article_type != article)
    status = run(runtime, photo(query_id), k=5, filters=Filters(article_type=article))
    assert status["status"] == "done", status
    found = [hit["product_id"] for hit in status["result"]["products"]]
    assert found == brute_force(indexed, indexed[query_id][1], 5, lambda e: e.article_type == article)
    assert {hit["article_type"] for hit in status["result"]["products"]} == {article}


def test_in_filters_year_range_category_and_exclusions_combine(runtime, indexed):
    query_id = next(iter(indexed))
    genders = ["Men", "Unisex"]
    exclude = brute_force(indexed, indexed[query_id][1], 2, lambda e: True)  # the query itself and its nearest
    filters = Filters(gender=genders, year=YearRange(gte=2011, lte=2013))
    category = Category(level="master_category", value="Accessories")

    def keep(e):
        return (e.gender in genders and 2011 <= (e.year or 0) <= 2013 and e.master_category == "Accessories"
                and e.product_id not in exclude)

    status = run(runtime, photo(query_id), k=8, filters=filters, category=category, exclude_ids=exclude)
    found = [hit["product_id"] for hit in status["result"]["products"]]
    expected = brute_force(indexed, indexed[query_id][1], 8, keep)
    assert len(expected) >= 3, "the sample should have a few products passing this filter"
    assert found == expected


def test_a_crop_is_searched_and_reported(runtime, indexed):
    query_id = next(iter(indexed))
    pixels = decode(photo(query_id), 1 << 24)
    height, width = pixels.shape[:2]
    box = Box(x=width // 4, y=height // 4, w=width // 2, h=height // 2)
    whole = run(runtime, photo(query_id))
    cropped = run(runtime, photo(query_id), crop=box)
    found = Segmenter().segment([pixels])[0]
    assert found.confident and (found.box.w, found.box.h) != (width, height)
    assert whole["result"]["box"] == found.box.model_dump()  # the product found by segmentation
    assert cropped["status"] == "done" and cropped["result"]["box"] == box.model_dump()
    assert cropped["result"]["products"][0]["score"] < whole["result"]["products"][0]["score"]

    outside = run(runtime, photo(query_id), crop=Box(x=width - 10, y=0, w=20, h=20))
    assert outside["status"] == "failed" and outside["error"]["code"] == "crop_outside_image"
    assert f"{width}x{height} px" in outside["error"]["message"]


def scaled_up(product_id: int) -> tuple[bytes, int, int, int]:
    """The sample photo of ``product_id`` scaled up to a phone photo's 1800-odd px (JPEG), and how
    many times, with the small photo's height and width."""
    pixels = decode(photo(product_id), 1 << 24)
    height, width = pixels.shape[:2]
    times = 1800 // max(height, width)
    out = io.BytesIO()
    Image.fromarray(pixels).resize((width * times, height * times), Image.BICUBIC).save(out, "JPEG", quality=92)
    return out.getvalue(), times, height, width


def test_a_phone_sized_photo_is_decoded_reduced_and_its_box_is_in_the_uploads_pixels(runtime, indexed):
    """A catalog photo scaled up to a phone photo's 1800-odd px: the worker decodes it at 1/2
    (workers.decode.decode_reduced), finds the same product and reports the box scaled up as much."""
    query_id = next(iter(indexed))
    data, times, height, width = scaled_up(query_id)
    small, big = run(runtime, photo(query_id)), run(runtime, data)
    assert big["status"] == "done", big
    assert big["result"]["products"][0]["product_id"] == small["result"]["products"][0]["product_id"] == query_id
    box, expected = big["result"]["box"], {key: times * value for key, value in small["result"]["box"].items()}
    slack = 2 * max(height, width) * times // 128  # 2 px of the segmentation's 128-px mask
    assert all(abs(box[key] - expected[key]) <= slack for key in box), (box, expected)
    assert box["x"] + box["w"] <= width * times and box["y"] + box["h"] <= height * times


def test_a_crop_of_a_phone_sized_photo_is_decoded_reduced_and_cut_where_the_box_says(runtime, indexed):
    """A caller's box on a catalog photo scaled up to 1800-odd px: decoded at 1/2 (the box keeps a
    long side of 448 px or more), cut at the box scaled into the decoded pixels, and embedded as the
    same box of the small photo is; the result reports the caller's box."""
    query_id = list(indexed)[1]
    data, times, height, width = scaled_up(query_id)
    box = Box(x=width // 4, y=height // 4, w=width - width // 4, h=height - height // 4)  # off-centre: 3/4 a side
    big_box = Box(x=box.x * times, y=box.y * times, w=box.w * times, h=box.h * times)
    assert decode_reduced(data, 1 << 24, DECODE_MIN_PX, region=big_box).pixels.shape[0] < height * times
    small, big = run(runtime, photo(query_id), crop=box, task=EmbedTask), run(runtime, data, crop=big_box,
                                                                            task=EmbedTask)
    assert big["status"] == "done" and big["result"]["box"] == big_box.model_dump(), big
    cosine = float(np.dot(small["result"]["vector"], big["result"]["vector"]))
    whole = run(runtime, photo(query_id), task=EmbedTask)  # the whole photo: a different part
    assert cosine >= 0.95 and cosine > float(np.dot(whole["result"]["vector"], big["result"]["vector"])) + 0.02, cosine


def test_more_like_this_excludes_the_product(runtime, indexed):
    product_id = list(indexed)[3]
    status = run(runtime, product_id=product_id, k=6)
    assert status["status"] == "done" and status["result"]["box"] is None
    found = [hit["product_id"] for hit in status["result"]["products"]]
    assert found == brute_force(indexed, indexed[product_id][1], 6, lambda e: e.product_id != product_id)

    missing = run(runtime, product_id=ID_OFFSET - 1)
    assert missing["status"] == "failed" and missing["error"]["code"] == "unknown_product"


def test_results_carry_the_predicted_categories(runtime, indexed):
    status = run(runtime, photo(next(iter(indexed))))
    categories = status["result"]["categories"]
    assert set(categories) == {"master_category", "sub_category", "article_type"}
    for top in categories.values():
        probs = [c["prob"] for c in top]
        assert len(top) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert status["result"]["category"] is None


def test_category_auto_searches_within_the_predicted_category(runtime, indexed):
    """The shipped heads on real sample photos: the chosen category is the product's own, and every hit is in it."""
    counts = Counter(e.article_type for e, _ in indexed.values())
    query_id = next(i for i, (e, _) in indexed.items() if counts[e.article_type] >= 3)
    event = indexed[query_id][0]
    status = run(runtime, photo(query_id), k=5, category="auto")
    chosen = status["result"]["category"]
    assert chosen is not None and status["result"]["categories"][chosen["level"]][0]["label"] == chosen["value"]
    assert getattr(event, chosen["level"]) == chosen["value"]
    found = [hit["product_id"] for hit in status["result"]["products"]]
    assert found == brute_force(indexed, indexed[query_id][1], 5,
                                lambda e: getattr(e, chosen["level"]) == chosen["value"])

    runtime.settings.auto_category_min_prob, saved = 1.0, runtime.settings.auto_category_min_prob
    try:  # nothing is that sure: no restriction
        unsure = run(runtime, photo(query_id), k=5, category="auto")
    finally:
        runtime.settings.auto_category_min_prob = saved
    assert unsure["result"]["category"] is None
    assert [h["product_id"] for h in unsure["result"]["products"]] == brute_force(
        indexed, indexed[query_id][1], 5, lambda e: True)


@pytest.fixture
def photo_server(indexed):
    """A real HTTP server on 127.0.0.1 serving the sample photos at /<product id>.jpg."""
    with serve_photos(lambda name: photo(int(name.removesuffix(".jpg")))) as url:
        yield url


def test_an_image_url_is_fetched_by_the_worker(runtime, indexed, photo_server):
    product_id = list(indexed)[7]
    status = run(runtime, image_url=f"{photo_server}/{product_id}.jpg")
    assert status["status"] == "done", status
    assert status["result"]["products"][0]["product_id"] == product_id
    assert status["timings"]["fetch"] > 0


def test_an_image_url_to_a_private_address_fails_without_the_allow_setting(runtime, indexed, photo_server):
    product_id = list(indexed)[7]
    guarded = Fetcher(runtime.settings.model_copy(update={"fetch_allow_private": False}))
    runtime.fetcher, allowing = guarded, runtime.fetcher
    try:
        status = run(runtime, image_url=f"{photo_server}/{product_id}.jpg")
    finally:
        runtime.fetcher = allowing
        guarded.close()
    assert status["status"] == "failed" and status["error"]["code"] == "url_refused"
    assert "LOOKALIKE_FETCH_ALLOW_PRIVATE" in status["error"]["message"]


def test_an_embedding_job_returns_the_vector_the_catalog_would_store(runtime, indexed):
    product_id = list(indexed)[5]
    job_id = new_job_id()
    runtime.store.create(job_id, photo(product_id))
    runtime.embed(EmbedTask(job_id=job_id))
    status = runtime.store.get(job_id)
    assert status.status == "done", status
    vector = np.array(status.result.vector, dtype=np.float32)
    assert status.result.dim == vector.shape[0] == 1280
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    assert float(vector @ indexed[product_id][1]) > 0.9999

    job_id = new_job_id()
    runtime.store.create(job_id, photo(product_id))
    runtime.embed(EmbedTask(job_id=job_id, crop=Box(x=0, y=0, w=9999, h=10)))
    status = runtime.store.get(job_id)
    assert status.status == "failed" and status.error.code == "crop_outside_image"


def test_a_micro_batch_gives_each_job_its_own_answer_and_a_bad_job_fails_alone(runtime, indexed, monkeypatch):
    from workers.tasks import Job

    ids = list(indexed)
    alone = [run(runtime, photo(i))["result"] for i in ids[:3]]
    tasks = []
    for image, options in [(photo(ids[0]), {}), (b"GIF89a not really", {}), (photo(ids[1]), {"k": 3}),
                           (None, {}),  # no upload in Redis: expired
                           (None, {"product_id": ids[4]}), (photo(ids[2]), {"crop": Box(x=0, y=0, w=9999, h=9)}),
                           (photo(ids[2]), {})]:
        job_id = new_job_id()
        runtime.store.create(job_id, image)
        tasks.append(SearchTask(job_id=job_id, **{"k": 5, **options}))
    tasks.insert(3, EmbedTask(job_id=new_job_id()))
    runtime.store.create(tasks[3].job_id, photo(ids[1]))
    forward = []
    embed = runtime.embedder.embed
    monkeypatch.setattr(runtime.embedder, "embed", lambda images: forward.append(len(images)) or embed(images))

    assert runtime.run([Job(task) for task in tasks]) == []
    got = [runtime.store.get(task.job_id) for task in tasks]
    assert [s.status.value for s in got] == ["done", "failed", "done", "done", "failed", "done", "failed", "done"]
    assert [s.error.code for s in got if s.error] == ["corrupt", "upload_expired", "crop_outside_image"]
    assert forward == [4]  # one forward pass for the four images that reached the model
    for status, expected in zip([got[0], got[7]], [alone[0], alone[2]]):  # as when run alone
        assert [h.product_id for h in status.result.products] == [h["product_id"] for h in expected["products"]]
        np.testing.assert_allclose([h.score for h in status.result.products],
                                   [h["score"] for h in expected["products"]], atol=1e-5)  # batch vs single forward
    assert [h.product_id for h in got[2].result.products] == [h["product_id"] for h in alone[1]["products"][:3]]
    assert float(np.array(got[3].result.vector) @ indexed[ids[1]][1]) > 0.9999
    assert ids[4] not in [h.product_id for h in got[5].result.products]  # more like this excludes itself
    assert got[5].result.products[0].product_id == brute_force(indexed, indexed[ids[4]][1], 2, lambda e: True)[1]


def test_a_batch_searches_the_catalog_once_for_all_its_jobs_that_filter_nothing(runtime, indexed, monkeypatch):
    """The batch's one search (the catalog's votes) answers its unfiltered jobs, their exclusions and
    "more like this" included; a filtered job still searches alone. Answers are those of brute force."""
    from workers.tasks import Job

    ids = list(indexed)
    gender = indexed[ids[3]][0].gender
    jobs = [({"k": 5}, ids[0]), ({"k": 12, "exclude_ids": ids[:2]}, ids[1]), ({"k": 3, "product_id": ids[4]}, None),
            ({"k": 4, "filters": Filters(gender=gender)}, ids[3])]
    tasks = []
    for options, image_id in jobs:
        tasks.append(SearchTask(job_id=new_job_id(), **options))
        runtime.store.create(tasks[-1].job_id, photo(image_id) if image_id else None)
    searched = []
    search = runtime.replica.shards.search
    monkeypatch.setattr(runtime.replica.shards, "search",
                        lambda queries, k, **kw: searched.append((len(queries), k, bool(kw))) or search(queries, k, **kw))

    assert runtime.run([Job(task) for task in tasks]) == []
    assert searched == [(4, 14, False), (1, 4, True)]  # k: 12 + the 2 excluded; then the filtered job alone
    found = [[h.product_id for h in runtime.store.get(task.job_id).result.products] for task in tasks]
    assert found == [brute_force(indexed, indexed[ids[0]][1], 5, lambda e: True),
                     brute_force(indexed, indexed[ids[1]][1], 12, lambda e: e.product_id not in ids[:2]),
                     brute_force(indexed, indexed[ids[4]][1], 3, lambda e: e.product_id != ids[4]),
                     brute_force(indexed, indexed[ids[3]][1], 4, lambda e: e.gender == gender)]


def test_a_worker_thread_searches_with_its_share_of_the_cores(runtime, indexed):
    """OpenMP thread counts are per thread: a Celery thread that never set one would search with one
    OpenMP thread per core beside the other threads' forward passes."""
    import faiss

    threads = []

    def job() -> None:
        run(runtime, photo(next(iter(indexed))))
        threads.append(faiss.omp_get_max_threads())

    worker_thread = threading.Thread(target=job)
    worker_thread.start()
    worker_thread.join()
    assert threads == [runtime.settings.model_threads()]


def test_a_batched_stage_that_fails_is_redone_job_by_job(runtime, indexed, monkeypatch):
    from workers.tasks import Job

    ids = list(indexed)
    poisoned = decode(photo(ids[1]), 1 << 24)
    crop_all = runtime.segmenter.crop_all

    def fails_on_one_image(images):  # stands for an image the segmenter cannot take
        if any(np.array_equal(image, poisoned) for image in images):
            raise RuntimeError("cannot segment this image")
        return crop_all(images)

    monkeypatch.setattr(runtime.segmenter, "crop_all", fails_on_one_image)
    tasks = []
    for i in ids[:3]:
        tasks.append(SearchTask(job_id=new_job_id(), k=5))
        runtime.store.create(tasks[-1].job_id, photo(i))
    assert runtime.run([Job(task) for task in tasks]) == []
    got = [runtime.store.get(task.job_id) for task in tasks]
    assert [s.status.value for s in got] == ["done", "failed", "done"]
    assert got[1].error.code == "internal" and "cannot segment this image" in got[1].error.message
    assert [s.result.products[0].product_id for s in (got[0], got[2])] == [ids[0], ids[2]]


def test_a_message_delivered_again_after_its_job_ended_does_not_run_it_again(runtime, indexed):
    """A worker killed between writing a result and acknowledging the message gets the message
    redelivered to another worker: the job keeps its first outcome (its upload is gone by then,
    so running it again would turn `done` into `failed`)."""
    task = SearchTask(job_id=new_job_id(), k=5)
    runtime.store.create(task.job_id, photo(list(indexed)[3]))
    runtime.search(task)
    first = runtime.store.get(task.job_id)
    assert first.status == "done" and runtime.store.take_upload(task.job_id) is None
    runtime.search(task)  # the same message again
    assert runtime.store.get(task.job_id) == first
