"""Run a grid of independent jobs through Dask distributed, cached per job and resumable.

A :class:`Job` is a pure function of a JSON-serialisable config. Each finished job is published to the
:class:`~fragile.run.cache.ResultCache` atomically by whichever process ran it, so a sweep that is killed
midway recomputes only the jobs that had not finished; a corrupt entry is detected by its digest and
recomputed. A job that raises is reported with its config and traceback while the others go on.

Every job runs on a single torch thread, so its numbers are the same bits wherever it runs.

Schedulers: ``"in-process"`` (no Dask: a plain loop, the smoke default), ``"local"`` (a ``LocalCluster``
sized to the machine, the embedded default) or the address of an existing scheduler
(``tcp://host:8786``, e.g. one started by dask-jobqueue on Slurm).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fragile.errors import InvalidArgumentError, check_int
from fragile.run.allocator import keep_freed_memory
from fragile.run.arithmetic import machine_arithmetic
from fragile.run.cache import ResultCache, config_key
from fragile.run.code import module_code_digest
from fragile.run.store import JobCompute, ResultStore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
"""The deadline on the whole connection to a scheduler address: TCP, Dask's handshake and the first reply."""
LOOPBACK = "127.0.0.1"
"""Where every socket this project opens listens (a local cluster's scheduler, workers and dashboard): only this
machine can reach them. A cluster meant for other machines is started by its own tools (``dask scheduler``,
dask-jobqueue) and named by its address."""
SCHEDULER_KINDS = ("in-process", "local")
# The entry of a job's cache config that holds the code digest of its function's module.
CODE_KEY = "code"
ADDRESS_PREFIXES = ("tcp://", "tls://", "inproc://", "ucx://")


def check_scheduler(scheduler: str) -> str:
    """Refuse a ``scheduler`` value that is neither a kind in :data:`SCHEDULER_KINDS` nor an address."""
    if not isinstance(scheduler, str) or not (scheduler in SCHEDULER_KINDS or scheduler.startswith(ADDRESS_PREFIXES)):
        raise InvalidArgumentError(
            f"scheduler={scheduler!r} is not allowed; use 'in-process', 'local' or an address like tcp://host:8786"
        )
    return scheduler


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(**config)``, cached under ``name`` and the digest of ``config``.

    ``fn`` must be importable by worker processes (a module-level function), and ``config`` must hold
    everything its result depends on. ``resources`` are Dask resource annotations, e.g. ``{"GPU": 1}``:
    the job then runs only on workers started with that resource (``--resources GPU=1``), one per GPU.
    They decide where a job runs, not what it computes, so they are not part of its key; nor is
    ``cost``, a rough relative run time: jobs are submitted most expensive first, so that a long job
    does not start last and leave the other workers idle; nor is ``runtime``, keyword arguments that say
    how to compute, not what (the ``device``): passed to ``fn`` beside ``config``.

    The job is cached under :attr:`cache_config`, its config plus the code digest of ``fn``'s module
    (:func:`~fragile.run.code.module_code_digest`, computed once per process): a result computed by
    other library code is a different entry, so it is recomputed, never reused.
    """

    name: str
    fn: Callable[..., Any]
    config: dict[str, Any]
    resources: dict[str, float] | None = None
    cost: float = 1.0
    runtime: dict[str, Any] | None = None

    @property
    def cache_config(self) -> dict[str, Any]:
        """``config`` plus :data:`CODE_KEY`: what the job is cached under (and its ``config.json`` records).

        Raises:
            InvalidArgumentError: ``config`` already holds :data:`CODE_KEY`, or ``fn``'s module has no source.
        """
        if CODE_KEY in self.config:
            raise InvalidArgumentError(f"config of job {self.name!r} holds {CODE_KEY!r}, which is reserved for the code digest")
        module = getattr(self.fn, "__module__", None)
        if module is None:
            raise InvalidArgumentError(f"fn of job {self.name!r} has no __module__; use a module-level function")
        return {**self.config, CODE_KEY: module_code_digest(module)}

    @property
    def key(self) -> str:
        return f"{self.name}/{config_key(self.cache_config)}"


SHARED_SCHEDULER_ENV = "FRAGILE_SHARED_SCHEDULER"
"""The environment variable through which the runner hands a notebook's kernel the address of the local cluster it
started for the whole book: a sweep asked to run on ``local`` joins that cluster instead of starting its own."""
EVENTS_ENV = "FRAGILE_SWEEP_EVENTS"
"""The environment variable naming a file where every sweep of this process appends its progress and its
outcome, one JSON object per line (:func:`read_events`): how the runner, outside the notebook's kernel, shows
per-job progress on the command line and learns which jobs failed."""


def _emit(event: dict[str, Any]) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    # One short line per write, opened in append mode: lines from one writer never interleave mid-line.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event, default=str) + "\n")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events a run appended to ``path`` (see :data:`EVENTS_ENV`); a last line cut off by a kill is ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Progress:
    """Jobs done of total, elapsed and an estimate of the time left, after every job: a tqdm bar in this process
    and, where :data:`EVENTS_ENV` is set, a progress event for the runner to print."""

    def __init__(self, total: int, cached: int, show: bool):
        self.total, self.cached, self.finished = total, cached, 0
        self.start = time.monotonic()
        self.bar = tqdm(total=total - cached, desc="sweep", disable=not show or total == cached)
        if total:
            self._event()

    def update(self) -> None:
        self.finished += 1
        self.bar.update()
        self._event()

    def _event(self) -> None:
        elapsed = time.monotonic() - self.start
        left = self.total - self.cached - self.finished
        eta = elapsed / self.finished * left if self.finished else math.nan
        _emit(
            {
                "event": "progress",
                "done": self.cached + self.finished,
                "total": self.total,
                "cached": self.cached,
                "elapsed": _duration(elapsed),
                "eta": _duration(eta) if math.isfinite(eta) else "unknown",
            }
        )

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class JobFailure:
    """A job that raised (or whose worker died): its config, the error line and the traceback. A value of its own
    type beside the results, never a result with a flag in it."""

    config: dict[str, Any]
    error: str
    traceback: str = ""


@dataclass
class SweepReport:
    """What a sweep did: results by job name, and which jobs ran, came from the cache, or failed."""

    results: dict[str, Any] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: dict[str, JobFailure] = field(default_factory=dict)
    stored: list[str] = field(default_factory=list)  # found in the committed result store
    seconds: dict[str, float] = field(default_factory=dict)  # run time of each job computed now
    dashboard: str | None = None  # the Dask dashboard of the cluster used, if any

    def summary(self) -> str:
        line = f"{len(self.done)} done, {len(self.cached)} cached, {len(self.failed)} failed"
        if self.stored:
            line += f", {len(self.stored)} from the store"
        for name, info in self.failed.items():
            line += f"\n  failed {name}: {info.error} (config {info.config})"
        return line

    def outcome(self) -> dict[str, Any]:
        """What the sweep did, as plain JSON: counts, and each failed job's config and its error's first line (the
        type and message); what a chapter's ``summary.json`` records and the command line reports."""
        return {
            "done": len(self.done),
            "cached": len(self.cached),
            "stored": len(self.stored),
            "failed": {
                name: {"error": (info.error.strip().splitlines() or [""])[0][:500], "config": info.config}
                for name, info in self.failed.items()
            },
        }


SWEEPS: list[dict[str, Any]] = []
"""The outcome (:meth:`SweepReport.outcome`) of every sweep this process ran, in order: a chapter's kernel records
them in its ``summary.json``."""


def job_device(job: Job) -> str:
    """The device a job computes on, as its config names it (``auto`` taking CUDA where this machine has it)."""
    device = str(job.config.get("device", "cpu"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _execute(job: Job, cache_config: dict[str, Any], cache_root: str, use_cache: bool) -> tuple[str, Any, JobCompute]:
    """Run one job and publish its result under ``cache_config`` (the driver's :attr:`Job.cache_config`,
    so a worker never digests its own copy of the code), holding the entry's lock meanwhile
    (:meth:`~fragile.run.cache.ResultCache.computing`): when another run of the same job holds it, this waits and
    returns that run's result as ``"cached"``. Never raises (a failure is returned with its traceback). Returns the
    status, the result (or the failure) and what the job took on this worker (:class:`~fragile.run.store.JobCompute`,
    times None for a cached result).

    The job runs on one torch thread wherever it runs: the thread count changes the order of
    floating-point reductions, and the same job must give the same bits in-process and on any worker.
    Parallelism comes from running jobs side by side. Freed memory stays in the process
    (:func:`~fragile.run.allocator.keep_freed_memory`): changes no number, only the time.
    """
    keep_freed_memory()
    cache = ResultCache(cache_root, enabled=use_cache)
    device = job_device(job)
    start, cpu_start = time.perf_counter(), time.process_time()

    def took() -> JobCompute:
        return JobCompute(time.process_time() - cpu_start, time.perf_counter() - start, device, machine_arithmetic(device))

    with cache.computing(job.name, cache_config):
        # another run of the same job on this cache may have finished it while this one waited for the lock
        hit = cache.load_or_discard(job.name, cache_config)
        if hit is not None:
            return "cached", hit, JobCompute(None, None, device, None)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            payload = job.fn(**job.config, **(job.runtime or {}))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, the sweep goes on
            return "failed", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, took()
        finally:
            torch.set_num_threads(threads)
        done = took()
        cache.save(job.name, cache_config, payload)
    return "ok", payload, done


def connect(scheduler: str, n_workers: int | None = None):
    """A Dask ``Client`` for ``"local"`` (a new ``LocalCluster``) or a scheduler address.

    A ``"local"`` cluster has ``n_workers`` single-threaded worker processes (default: one per CPU); its scheduler,
    workers and dashboard listen on :data:`LOOPBACK` only. An address where no Dask scheduler answers (a closed
    port, a listener that never replies, a server speaking another protocol) raises :class:`InvalidArgumentError`
    in one line, within about :data:`CONNECT_TIMEOUT_S` seconds whatever the other end does.
    """
    from distributed import Client, LocalCluster

    check_scheduler(scheduler)
    if scheduler == "in-process":
        raise InvalidArgumentError("scheduler='in-process' runs without Dask; there is no client to connect")
    if n_workers is not None:
        check_int("n_workers", n_workers, minimum=1)
    if scheduler == "local":
        import dask

        workers = n_workers or max(1, (os.cpu_count() or 1))
        # Saturation 1.0: a worker holds only the job it runs, so when a job kills its worker no queued
        # bystander is blamed for the death (Dask counts every task on a dead worker as suspicious).
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host=LOOPBACK,
                dashboard_address=f"{LOOPBACK}:0",
            )
        client = Client(cluster)
    else:
        client = _connect_address(scheduler)
    log.info("Dask dashboard: %s", client.dashboard_link)
    return client


def _connect_address(scheduler: str):
    """A client of the scheduler at ``scheduler``, or one line saying why not, within the deadline.

    Dask's own ``timeout`` covers the TCP connection but not every step after it: a listener that accepts and
    never replies, or an HTTP server whose reply is read as a frame length, can hang or fail deep inside the
    handshake. So the whole attempt runs in a daemon thread that is abandoned at the deadline."""
    from distributed import Client

    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            outcome["client"] = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except BaseException as exc:  # noqa: BLE001 - whatever went wrong becomes the one line below
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, name="fragile-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 2)
    where = f"scheduler={scheduler!r} (--scheduler)"
    if "client" in outcome:
        return outcome["client"]
    if thread.is_alive():
        raise InvalidArgumentError(f"{where}: no Dask scheduler finished the handshake within {CONNECT_TIMEOUT_S} s")
    exc = outcome.get("error")
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    raise InvalidArgumentError(f"{where}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s ({reason[:200]})")


def close(client) -> None:
    """Close a client from :func:`connect`, and its ``LocalCluster`` when it made one."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


@contextmanager
def shared_scheduler(scheduler: str, n_workers: int | None = None) -> Iterator[tuple[str, str | None]]:
    """The address of a Dask scheduler to hand to several sweeps (e.g. every chapter of a book run), and
    its dashboard.

    ``"local"`` starts one ``LocalCluster`` for the whole block, so the chapters share its workers; an
    address is checked (an unreachable one fails here, within seconds) and yielded unchanged.
    """
    client = connect(scheduler, n_workers)
    try:
        yield client.scheduler.address, client.dashboard_link
    finally:
        close(client)


def run_sweep(
    jobs: Sequence[Job],
    *,
    cache_dir: str,
    use_cache: bool = True,
    scheduler: str = "in-process",
    n_workers: int | None = None,
    client=None,
    progress: bool = True,
    store: ResultStore | None = None,
    publish: bool = False,
) -> SweepReport:
    """Run every job not already stored or cached, through the chosen scheduler, and collect the results.

    Args:
        jobs: the grid; names must be unique.
        cache_dir: where results are cached (must be shared with the workers).
        use_cache: read and write the cache.
        scheduler: ``"in-process"``, ``"local"`` or a scheduler address; the workers of a remote
            cluster must see ``cache_dir`` at the same path (a shared file system).
        n_workers: workers of a ``"local"`` cluster (default: one per CPU).
        client: an existing Dask client to use instead of ``scheduler``.
        progress: a tqdm bar over jobs.
        store: the committed result store, looked up before the cache (a job found there is ``stored``); a damaged
            entry raises :class:`~fragile.run.store.StoreError` naming the job, before any job runs.
        publish: also save every finished job (computed now or found in the cache) to ``store``, each as it lands.
    """
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("jobs have repeated names; each job needs its own name")
    if client is None:
        check_scheduler(scheduler)
        if scheduler == "local" and os.environ.get(SHARED_SCHEDULER_ENV):
            scheduler = check_scheduler(os.environ[SHARED_SCHEDULER_ENV])
    if n_workers is not None:
        check_int("n_workers", n_workers, minimum=1)
    # Workers get an absolute path: their working directory need not be ours.
    cache = ResultCache(Path(cache_dir).resolve(), enabled=use_cache)
    report = SweepReport()
    todo = []
    keyed = {job.name: job.cache_config for job in jobs}
    if publish and store is None:
        raise InvalidArgumentError("publish=True needs a store to publish to")
    for job in jobs:
        kept = store.load(job.name, job.config) if store is not None else None
        if kept is not None:
            report.results[job.name] = kept
            report.stored.append(job.name)
            continue
        hit = cache.load_or_discard(job.name, keyed[job.name])
        if hit is None:
            todo.append(job)
        else:
            report.results[job.name] = hit
            report.cached.append(job.name)
            if publish:
                store.save(job.name, job.config, hit, JobCompute(None, None, job_device(job), None))  # type: ignore[union-attr]

    def record(job: Job, status: str, value: Any, took: JobCompute | None = None) -> None:
        if publish and status in ("ok", "cached"):  # as each job lands: a long run killed midway keeps what finished
            store.save(job.name, job.config, value, took or JobCompute(None, None, job_device(job), None))  # type: ignore[union-attr]
        if status == "cached":  # finished by another run while this one waited for it
            report.results[job.name] = value
            report.cached.append(job.name)
            return
        report.seconds[job.name] = took.wall_seconds if took is not None and took.wall_seconds is not None else float("nan")
        if status == "ok":
            report.results[job.name] = value
            report.done.append(job.name)
        else:
            report.failed[job.name] = JobFailure(job.config, **value)
            log.error("job %s failed: %s", job.name, value["error"])

    todo.sort(key=lambda j: -j.cost)  # stable: equal costs keep their order
    bar = _Progress(len(jobs), len(report.cached) + len(report.stored), progress)
    if todo and scheduler == "in-process" and client is None:
        for job in todo:
            record(job, *_execute(job, keyed[job.name], str(cache.root), use_cache))
            bar.update()
    elif todo:
        from distributed import as_completed

        own = client is None
        client = client or connect(scheduler, n_workers)
        report.dashboard = client.dashboard_link
        try:
            # A fresh token per sweep: the cluster may still hold an earlier sweep's task of the same job
            # (released asynchronously), and reusing it would skip publishing to this sweep's cache.
            token = uuid.uuid4().hex[:8]
            futures = {
                client.submit(
                    _execute,
                    job,
                    keyed[job.name],
                    str(cache.root),
                    use_cache,
                    key=f"fragile-{job.key}-{token}",
                    pure=False,
                    retries=1,
                    resources=job.resources,
                ): job
                for job in todo
            }
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    record(job, *fut.result())
                except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the worker died more than allowed
                    record(job, "failed", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
                bar.update()
        finally:
            if own:
                close(client)
    bar.close()
    log.info("sweep: %s", report.summary())
    outcome = report.outcome()
    SWEEPS.append(outcome)
    _emit({"event": "sweep", **outcome})
    return report
