"""Department routing (real embedder, sample index): accuracy, candidate restriction, confidence."""

from __future__ import annotations

import numpy as np
import pytest

from ragpt.data.sample import SAMPLE_DEPARTMENTS, sample_questions
from ragpt.errors import EmptyQuestionError, UnknownDepartmentError
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.router import DepartmentRouter, chunk_vectors, routing_accuracy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


@pytest.fixture(scope="module")
def index(sample_index):
    settings, name = sample_index
    return DocumentIndex.open(settings.index_dir, name)


@pytest.fixture(scope="module")
def router(index, real_embedder):
    return DepartmentRouter.from_index(index, real_embedder)


def _labelled():
    return [(q.question, q.department) for q in sample_questions()]


def test_chunk_vectors_are_the_stored_embeddings_of_the_departments_chunks(index, real_embedder):
    vecs = chunk_vectors(index, "it")
    ids = index.allowed_ids("it")
    assert vecs.shape == (len(ids), real_embedder.dim)
    first = index.chunks[int(ids[0])]
    again = real_embedder.encode([first.text])[0]
    # Re-embedding the chunk text gives back the vector FAISS stored: ids and vectors line up.
    assert float(again @ vecs[0]) > 0.99
    assert float(again @ vecs[1]) < 0.99


@pytest.mark.parametrize("method, floor", [("nearest", 0.9), ("centroid", 0.8)])
def test_routing_accuracy_on_the_sample_questions(index, real_embedder, method, floor):
    r = DepartmentRouter.from_index(index, real_embedder, method=method)
    rep = routing_accuracy(r, _labelled(), thresholds=(0.5,))
    assert rep["n"] == 60
    assert rep["accuracy"] >= floor, rep["confusion"]
    assert sum(row["n"] for row in rep["per_department"].values()) == 60
    assert set(rep["per_department"]) == set(SAMPLE_DEPARTMENTS)
    correct = sum(rep["confusion"][d].get(d, 0) for d in SAMPLE_DEPARTMENTS)
    assert rep["accuracy"] == round(correct / 60, 4)
    assert 0 < rep["at_confidence"]["0.5"]["coverage"] <= 1


def test_nearest_routes_better_than_centroids_here(index, real_embedder):
    # The reason "nearest" is the default: departments cover many topics, their mean vector blurs them.
    acc = {m: routing_accuracy(DepartmentRouter.from_index(index, real_embedder, method=m), _labelled())["accuracy"]
           for m in ("nearest", "centroid")}
    assert acc["nearest"] > acc["centroid"]


def test_routing_is_restricted_to_the_allowed_departments(router):
    q = "How do I connect to the VPN from home?"
    assert router.route(q).department == "it"
    d = router.route(q, allowed=["hr", "finance"])
    assert d.department in {"hr", "finance"}
    assert set(d.scores) == {"hr", "finance"}
    only = router.route(q, allowed=["finance"])
    assert only.department == "finance" and only.share == pytest.approx(1.0)
    # The confidence is absolute: one candidate does not make an unrelated question certain.
    assert only.confidence < 0.5


def test_confidence_is_high_for_a_clear_question_and_near_uniform_for_a_vague_one(router):
    clear = router.route("How many weeks of paid parental leave do fathers get?")
    assert clear.department == "hr" and clear.confidence > 0.8
    vague = router.route("hello")
    assert vague.confidence < clear.confidence
    assert max(vague.scores, key=vague.scores.get) == vague.department


DEFAULT_MIN_CONFIDENCE = 0.5  # services/config.py RouterConfig.min_confidence
OFF_TOPIC = ["What is the capital of France?", "How do I bake sourdough bread at home?",
             "Who won the 2018 FIFA World Cup?", "How tall is Mount Everest?"]


def test_off_topic_questions_fall_below_the_default_threshold_on_topic_ones_above(router):
    for allowed in (None, ["hr", "it"]):
        for d in router.route_many(OFF_TOPIC, allowed):
            assert d.confidence < DEFAULT_MIN_CONFIDENCE, d.to_dict()
    # Between two departments the relative share is always >= 0.5: it could never refuse.
    france = router.route("What is the capital of France?", allowed=["hr", "it"])
    assert france.share >= 0.5 > france.confidence
    for dept in SAMPLE_DEPARTMENTS:
        qs = [q.question for q in sample_questions(dept)]
        confs = [d.confidence for d in router.route_many(qs)]
        assert min(confs) >= DEFAULT_MIN_CONFIDENCE, (dept, min(confs))


def test_the_relative_share_is_still_reported(router):
    d = router.route("How many weeks of paid parental leave do fathers get?")
    rep = d.to_dict()
    assert set(rep) >= {"department", "confidence", "share", "similarity", "scores"}
    assert rep["share"] == round(d.share, 4) and 0 < d.share <= 1
    assert rep["similarity"] == round(d.scores["hr"], 4)
    assert sum(np.exp(np.array(list(d.scores.values())) / router.temperature)
               / np.exp(d.similarity / router.temperature)) == pytest.approx(1 / d.share, rel=1e-3)
    assert rep["confidence"] < 1.0  # never rounded up to a certainty
    rep = routing_accuracy(router, _labelled())
    assert 0 < rep["mean_share"] <= 1 and 0 < rep["mean_confidence"] < 1


def test_example_questions_define_a_department(index, real_embedder):
    examples = {"legal": ["Is my personal data sold to third parties?", "How long do you keep my data?",
                          "Can I ask you to delete my personal data?"]}
    vectors = {d: chunk_vectors(index, d) for d in SAMPLE_DEPARTMENTS}
    vectors["legal"] = real_embedder.encode(examples["legal"])
    r = DepartmentRouter(real_embedder, vectors)
    assert r.route("Do you share my personal data with advertisers?").department == "legal"
    assert r.route("How many vacation days do I get?").department == "hr"
    # from_index: a department with examples uses them instead of its chunks.
    r2 = DepartmentRouter.from_index(index, real_embedder, ["hr", "it"],
                                     examples={"it": ["Is my personal data sold to third parties?"]})
    assert r2.route("Do you share my personal data with advertisers?").department == "it"


def test_router_errors_are_clear(router, real_embedder):
    with pytest.raises(UnknownDepartmentError, match="legal"):
        router.route("VPN?", allowed=["legal"])
    with pytest.raises(EmptyQuestionError):
        router.route("   ")
    with pytest.raises(ValueError, match="method"):
        DepartmentRouter(real_embedder, {"hr": np.ones((1, real_embedder.dim))}, method="magic")
    with pytest.raises(Exception, match="dimension"):
        DepartmentRouter(real_embedder, {"hr": np.ones((1, 3))})
