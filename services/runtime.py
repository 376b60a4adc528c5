"""The service's resources, loaded once: models, one pipeline per index, the router, the batcher, the keys.

Everything HTTP-free lives here, so the routes in `ragpt_service.app` stay thin: which department
and prompt version a `model` string names, `auto` routing, submission with admission
(`ragpt_service.admission`: a request is taken only if it is expected to finish in its timeout),
the requests being answered and the service's measured speed.

Many departments (a thousand) cost start-up and memory in proportion to what is used, not to what
is configured: start-up opens each index once and checks every department against one set of its
departments; no prompt version is loaded or verified until a request uses it (then its checksums
are checked: `PromptRegistry.load`); at most `[batching] prefix_cache_size` versions stay loaded and
as many prefixes cached (least recently used out); resolving a request's version and `GET /v1/models`
read the registry's replayed log, never a version's files.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ragpt.config import Settings
from ragpt.errors import PromptMismatchError, SoftPromptError
from ragpt.lm.generator import Generator, load_generator
from ragpt.lm.models import Embedder, load_embedder
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.router import DepartmentRouter, chunk_vectors
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest, Turn
from ragpt.serving.scheduler import BatcherStopped, ChatJob, ContinuousBatcher, MicroBatcher, Overloaded, Ticket
from ragpt.softprompts.registry import PromptRegistry, UnknownPromptDepartmentError
from ragpt_service.admin import AdminAuth
from ragpt_service.admission import Estimate, Live, ServiceRate, estimate, full_queue_retry_after_s, retry_after_s
from ragpt_service.auth import KeyRing
from ragpt_service.config import ServiceConfig
from ragpt_service.errors import ApiError, quote
from ragpt_service.metrics import ServiceMetrics
from ragpt_service.sessions import SessionTable

log = logging.getLogger("ragpt.service")


def service_settings(config: ServiceConfig, settings: Settings) -> Settings:
    """ragpt's settings with the service config's index_dir/prompt_dir, where it sets them."""
    updates = {k: v for k, v in (("index_dir", config.index_dir), ("prompt_dir", config.prompt_dir))
               if v is not None}
    return settings.model_copy(update=updates)


def _check_department(index: DocumentIndex, known: frozenset[str], dept: str) -> None:
    """index.check_department(dept) against the index's departments computed once: the index
    derives its department list from every chunk on each call, so checking a thousand departments
    one call each cost a thousand passes over the chunks at start-up. The index raises the error."""
    if dept not in known:
        index.check_department(dept)


def config_problems(config: ServiceConfig, settings: Settings) -> list[str]:
    """What keeps a config from working, found without loading a model: each index must open (its
    checksums pass) and hold its departments' documents. Empty when the config can work."""
    s = service_settings(config, settings)
    problems: list[str] = []
    opened: dict[str, tuple[DocumentIndex, frozenset[str]] | None] = {}
    for dept in config.departments:
        name = config.index_of(dept)
        if name not in opened:
            try:
                index = DocumentIndex.open(s.index_dir, name)
                opened[name] = (index, frozenset(index.departments))
            except Exception as e:
                opened[name] = None
                problems.append(str(e))
        if opened[name] is not None:
            try:
                _check_department(*opened[name], dept)
            except Exception as e:
                problems.append(str(e))
    return problems


def prompt_unavailable(department: str, version: str, *, mismatch: bool = False) -> ApiError:
    """A version that failed its checks at load: named, so the client knows what is unavailable and
    how to ask without it; the file and the details go to the server log only (as for a 500).
    `mismatch`: intact, but made for another base model or embedder than this service runs."""
    if mismatch:
        what, fix = ("was made for another base model or embedder than this service runs", "retrain or roll back")
    else:
        what, fix = "failed its integrity checks when it was loaded", "restore or roll back"
    return ApiError(503, f"the soft prompt {department} {version} {what} and is not served (the server log says "
                         f"why); an administrator must {fix} that version. Model {quote(department + '@none')} "
                         "answers without it", code="prompt_unavailable", param="model")


class BoundedWorkers:
    """At most `limit` jobs at once, each in a thread of its own pool: a job more is refused
    (`submit` returns None) rather than queued. A job counts from `submit` until its thread has
    finished it (or it was cancelled before it started), so a request that timed out still holds
    its place while its work runs on."""

    def __init__(self, limit: int, name: str):
        self.limit = limit
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix=name)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future | None:
        with self._lock:
            if self._count >= self.limit:
                return None
            self._count += 1
        job = self._pool.submit(fn)
        job.add_done_callback(self._finished)
        return asyncio.wrap_future(job)

    def _finished(self, _job) -> None:
        with self._lock:
            self._count -= 1


class ServicePipeline(Pipeline):
    """The service's pipeline of one index: `Pipeline`, where a version that fails its checks when
    it is loaded (checksum, shape, base model; verified at first use, not at start-up) is a 503
    `prompt_unavailable` for the requests that use it, naming it, while every other department
    is answered as before. It is not kept: a restored file is served at the next request. (A
    damaged audit log stays what it was, a 500: it is not one version's problem.)
    """

    def load_version(self, department: str, version: str, *, with_adapter: bool = False) -> tuple:
        try:
            return super().load_version(department, version, with_adapter=with_adapter)
        except SoftPromptError as e:
            log.error("department %s: soft prompt %s failed its checks at load and is not served: %s",
                      department, version, e)
            raise prompt_unavailable(department, version, mismatch=isinstance(e, PromptMismatchError)) from e


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"model {quote(model)} not found for this key; GET /v1/models lists the models it may use",
                    code="model_not_found", param="model")


class ServiceRuntime:
    def __init__(self, config: ServiceConfig, settings: Settings, *, embedder: Embedder | None = None,
                 generator: Generator | None = None):
        self.settings = service_settings(config, settings)
        self.config = config
        self.keys = KeyRing({d: c.api_keys for d, c in config.departments.items()},
                            required=config.require_api_key)
        self._embedder = embedder
        self._generator = generator
        self.pipelines: dict[str, Pipeline] = {}  # department -> pipeline of its index
        self.router: DepartmentRouter | None = None
        self.batcher: MicroBatcher | None = None
        self.status = "loading"  # -> "ready" or "failed"
        self.error: str | None = None
        self.started = time.time()
        self.rate = ServiceRate()  # measured from finished answers; admission uses it
        self.prompt_embeds_builds = BoundedWorkers(config.limits.max_prompt_embeds_in_flight, "prompt-embeds")
        self._live: dict[Ticket, Live] = {}  # submitted and not yet released by its route
        self.metrics = ServiceMetrics(self)
        self.chat_sessions = SessionTable("department", config.admin.session_hours * 3600)
        self.admin = AdminAuth(config.admin, self.keys)
        self.admin_registry = PromptRegistry(self.settings.prompt_dir)  # the console's changes go here

    # -------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """Load models, open indexes, build the router, start the batcher. Sets `status`."""
        try:
            s, cfg = self.settings, self.config
            # The batcher's worker (retrieval) and the router (another thread) share the embedder;
            # Embedder.encode serialises its calls itself.
            embedder = self._embedder or load_embedder(s)
            generator = self._generator or load_generator(s)
            b = cfg.batching
            # The service's bound on held prefixes (the generator's default is 64 entries).
            generator.prefix_cache.resize(b.prefix_cache_size)
            by_index: dict[str, ServicePipeline] = {}
            known: dict[str, frozenset[str]] = {}
            for dept in cfg.departments:
                name = cfg.index_of(dept)
                if name not in by_index:
                    by_index[name] = ServicePipeline(DocumentIndex.open(s.index_dir, name), s, embedder=embedder,
                                                     generator=generator, prefix_cache=b.prefix_cache,
                                                     max_prompts=b.prefix_cache_size)
                    known[name] = frozenset(by_index[name].index.departments)
                _check_department(by_index[name].index, known[name], dept)
                self.pipelines[dept] = by_index[name]
            for pipe in by_index.values():
                pipe.retriever.prepare()  # checks the index's embedder matches, builds BM25 before any request
            if cfg.router.enabled:
                vectors = {}
                for dept, pipe in self.pipelines.items():
                    ex = [q for q in cfg.departments[dept].examples if q.strip()]
                    vectors[dept] = embedder.encode(ex) if ex else chunk_vectors(pipe.index, dept)
                rc = cfg.router
                self.router = DepartmentRouter(embedder, vectors, method=rc.method, top_m=rc.top_m,
                                               temperature=rc.temperature)
            if b.scheduler == "continuous" and generator.engine is None:
                log.warning("continuous batching needs the packed engine, which this model or decode_engine "
                            "setting does not allow: batching statically")
            if b.scheduler == "continuous" and generator.engine is not None:
                self.batcher = ContinuousBatcher(generator, max_batch_size=b.max_batch_size, max_queue=b.max_queue,
                                                 max_prefill_tokens=b.max_prefill_tokens,
                                                 long_prompt_slowdown=b.long_prompt_slowdown)
            else:
                self.batcher = MicroBatcher(generator, max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms,
                                            max_queue=b.max_queue, policy=b.policy)
            self.batcher.start()
            self.status = "ready"
            log.info("ragpt service ready: %d departments in %.1fs", len(self.pipelines), time.time() - self.started)
        except Exception as e:
            self.status = "failed"
            self.error = f"{type(e).__name__}: {e}"
            log.error("ragpt service failed to load: %s", self.error)
            raise

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    def check_ready(self) -> None:
        if self.status == "ready":
            return
        if self.status == "failed":
            raise ApiError(503, f"the service failed to start: {self.error}", code="not_ready")
        raise ApiError(503, "the service is still loading its models", code="not_ready",
                       headers={"Retry-After": "5"})

    # -------------------------------------------------------------- departments and prompts
    def registry_for(self, dept: str):
        return self.pipelines[dept].registry

    def resolve_model(self, model: str, allowed: frozenset[str]) -> tuple[str | None, str]:
        """(department, prompt) named by `model`: "dept", "dept@v3", "dept@none", or (None, ...) for "auto"."""
        name, sep, version = model.partition("@")
        if name == "auto":
            if sep:
                raise ApiError(400, "'auto' cannot pin a prompt version", code="invalid_model", param="model")
            return None, "active"
        if name not in allowed:
            # One answer for a department that does not exist and one this key may not use, so a key
            # cannot find out which departments exist.
            raise model_not_found(model)
        if not sep:
            return name, "active"
        if version == "none":
            return name, "none"
        return name, self._check_version(name, version)

    def _check_version(self, dept: str, version: str) -> str:
        """Only approved (or active) versions are served; drafts are not reviewed yet."""
        try:
            states = self.registry_for(dept).states(dept)  # the log alone: no version file is read
        except UnknownPromptDepartmentError:
            states = {}
        state = states.get(version)
        if state is None:
            raise ApiError(404, f"department {dept!r} has no prompt version {quote(version)}",
                           code="model_not_found", param="model")
        if state not in ("approved", "active"):
            raise ApiError(404, f"{dept} {version} is a {state}; only approved versions are served",
                           code="model_not_found", param="model")
        return version

    def models(self, allowed: frozenset[str]) -> list[dict]:
        out = []
        for dept in sorted(allowed):
            row = {"id": dept, "object": "model", "created": int(self.started), "owned_by": "ragpt",
                   "department": dept, "active_prompt_version": None, "prompt_versions": []}
            try:
                # From the replayed log alone: reading each version's meta.json made this O(versions) file reads.
                states = self.registry_for(dept).states(dept)
                row["active_prompt_version"] = next((v for v, st in states.items() if st == "active"), None)
                row["prompt_versions"] = [v for v, st in states.items() if st in ("approved", "active")]
            except UnknownPromptDepartmentError:
                pass  # no soft prompts: answered without one
            except Exception as e:  # a damaged registry: listed without versions, the log says why
                log.error("cannot list the prompt versions of %s: %s: %s", dept, type(e).__name__, e)
                row["error"] = "its prompt versions cannot be read; see the server log"
            out.append(row)
        if self.router is not None:
            out.append({"id": "auto", "object": "model", "created": int(self.started), "owned_by": "ragpt",
                        "department": None, "active_prompt_version": None, "prompt_versions": []})
        return out

    def readiness(self, allowed: frozenset[str] | None) -> dict:
        """What /readyz answers: the status to anyone; the key's departments and the error with a valid key."""
        body: dict = {"status": self.status}
        if allowed is not None:
            body["departments"] = sorted(set(self.pipelines) & allowed)
            body["error"] = self.error
            if self.batcher is not None:
                body["queued"] = self.batcher.queued
        return body

    # -------------------------------------------------------------- routing and submission
    async def route(self, question: str, allowed: frozenset[str]) -> tuple[str, str, dict]:
        """(department, prompt, routing report) for an `auto` request, among the key's departments."""
        if self.router is None:
            raise ApiError(400, "'auto' routing is disabled in this service; name a department",
                           code="invalid_model", param="model")
        decision = await asyncio.to_thread(self.router.route, question, sorted(allowed))
        rc = self.config.router
        confident = decision.confidence >= rc.min_confidence
        report = {**decision.to_dict(), "min_confidence": rc.min_confidence, "soft_prompt": confident}
        if confident:
            return decision.department, "active", report
        if rc.below_threshold == "refuse":
            raise ApiError(422, f"cannot tell which department should answer (best {decision.department!r} "
                                f"with confidence {decision.confidence:.2f} < {rc.min_confidence}); "
                                "name the department as the model", code="routing_uncertain", param="model")
        return decision.department, "none", report

    @property
    def default_max_tokens(self) -> int:
        """What a request without max_tokens gets; never over the limit."""
        limits = self.config.limits
        return min(limits.default_max_tokens or self.settings.max_new_tokens, limits.max_tokens)

    @property
    def inflight(self) -> int:
        """Requests submitted and still being answered (queued or running; an abandoned one leaves at once)."""
        return len(self._live)

    def estimate(self, max_tokens: int | None = None) -> Estimate | None:
        """When a new request of `max_tokens` would finish, from the measured speed (None: nothing measured)."""
        slots = self.batcher.max_batch_size if self.batcher is not None else self.config.batching.max_batch_size
        model = self.batcher if isinstance(self.batcher, ContinuousBatcher) else None
        return estimate(self.rate, list(self._live.values()), slots, max_tokens or self.default_max_tokens,
                        model=model)

    def submit(self, *, department: str, prompt: str, question: str, history: tuple[Turn, ...],
               system: str | None, overrides: dict | None, max_tokens: int | None, temperature: float | None,
               stream: bool) -> Ticket:
        """Queue a request if it is expected to finish within the timeout (503 `overloaded` if not).
        The caller must `release` the ticket when it is done with it, whatever happened."""
        self.check_ready()
        timeout = self.config.limits.request_timeout_s
        max_new = max_tokens or self.default_max_tokens
        est = self.estimate(max_new)
        if est is not None and est.wait_s > 0 and est.total_s > timeout:
            retry = retry_after_s(est, timeout)
            ahead = f"{est.ahead} request{' is' if est.ahead == 1 else 's are'}"
            raise ApiError(503, f"overloaded: {ahead} ahead of this one, which is expected to finish in "
                                f"{est.total_s:.2f}s, over the {timeout:g}s timeout; retry in {retry}s",
                           code="overloaded", headers={"Retry-After": str(retry)})
        request = ChatRequest(question, department, history=history, system=system, prompt=prompt,
                              overrides=overrides, max_new_tokens=max_new, temperature=temperature)
        try:
            ticket = self.batcher.submit(ChatJob(request, self.pipelines[department], stream=stream))
        except Overloaded as e:
            retry = full_queue_retry_after_s(est, timeout) if est is not None else self.config.limits.retry_after_s
            raise ApiError(503, f"overloaded: {e}; retry in {retry}s", code="overloaded",
                           headers={"Retry-After": str(retry)}) from e
        except BatcherStopped as e:
            raise ApiError(503, str(e), code="not_ready", headers={"Retry-After": "5"}) from e
        # Only predictions that included a wait calibrate admission: they are the ones it decides on.
        predicted = est.total_s if est is not None and est.wait_s > 0 else None
        self._live[ticket] = Live(max_new, admitted=time.monotonic(), predicted_s=predicted)
        return ticket

    def running(self, ticket: Ticket) -> None:
        """The ticket's request is prepared: its row runs from now (for the estimate of those behind it)."""
        live = self._live.get(ticket)
        if live is not None and live.started is None:
            live.started = time.monotonic()

    def answered(self, ticket: Ticket, answer) -> None:
        """Learn the service's speed from a finished answer."""
        self.rate.observe(answer.timings, answer.usage.get("completion_tokens", 0),
                          ticket.job.request.max_new_tokens or self.default_max_tokens,
                          answer.usage.get("prompt_tokens"))
        live = self._live.get(ticket)
        if live is not None and live.predicted_s:
            self.rate.observe_finish(live.predicted_s, time.monotonic() - live.admitted)

    def release(self, ticket: Ticket) -> None:
        """The route is done with the ticket (answered, failed, timed out or abandoned): stop its work."""
        ticket.cancel()  # a no-op when it is done
        self._live.pop(ticket, None)
