"""The sweep layer on a real LocalCluster with 2 worker processes on loopback."""

import contextlib
import http.server
import os
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch
from sweep_jobs import always_die, die_once, fail_if, meet, sleep_span, train_small, train_small_after_gate

from fragile.chapters import iris
from fragile.errors import InvalidArgumentError
from fragile.run.sweep import CONNECT_TIMEOUT_S, Job, close, connect, run_sweep


def _grid(steps=60):
    return [Job(f"t/s{s}-w{w}", train_small, {"seed": s, "width": w, "steps": steps}) for s in range(3) for w in (3, 5)]


@pytest.fixture(scope="module")
def client():
    c = connect("local", n_workers=2)
    yield c
    close(c)


def test_same_numbers_in_process_and_on_two_workers(tmp_path, client):
    local = run_sweep(_grid(), cache_dir=str(tmp_path / "a"), scheduler="in-process", progress=False)
    dist = run_sweep(_grid(), cache_dir=str(tmp_path / "b"), client=client, progress=False)
    assert sorted(local.done) == sorted(dist.done) and not dist.failed
    for name, value in local.results.items():
        assert torch.equal(value["params"], dist.results[name]["params"]), name
    assert len({v["pid"] for v in dist.results.values()}) == 2, "both workers took jobs"


def _iris_numbers(groups) -> list[torch.Tensor]:
    out = []
    for g in groups:
        assert isinstance(g, iris.ArchitectureResult)
        for r in g.runs:
            if isinstance(r, iris.IrisRun):
                out += [
                    torch.as_tensor(v)
                    for v in (r.predicted_all, r.loo.actual, r.loo.actual_vs_control, r.lambda_max, r.grad_norm)
                ]
            else:
                assert isinstance(r, iris.FailedRun) and r.failure.message
    return out


def test_iris_grid_same_bits_in_process_one_worker_and_two_workers(tmp_path, client):
    """The chapter's own jobs: the numbers do not depend on where a job ran."""
    cfg = iris.IrisConfig(n_seeds=2, depths=(1, 2), widths=(8,), train_steps=150, retrain_steps=20, use_cache=False)
    local, rep_local = iris.run_study(replace(cfg, scheduler="in-process"), progress=False)
    two, rep_two = iris.run_study(cfg, client=client, progress=False)
    one, rep_one = iris.run_study(replace(cfg, n_workers=1), progress=False)
    assert len(rep_local.done) == len(rep_two.done) == len(rep_one.done) == 3
    assert not (rep_local.failed or rep_two.failed or rep_one.failed)
    assert rep_local.dashboard is None and rep_two.dashboard.startswith("http")
    a, b, c = _iris_numbers(local), _iris_numbers(two), _iris_numbers(one)
    assert len(a) == len(b) == len(c) > 0
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_rerun_recomputes_nothing_and_failures_are_reported(tmp_path, client):
    first = run_sweep(_grid(), cache_dir=str(tmp_path), client=client, progress=False)
    again = run_sweep(_grid(), cache_dir=str(tmp_path), client=client, progress=False)
    assert len(first.done) == 6 and again.done == [] and len(again.cached) == 6
    assert all(torch.equal(first.results[k]["params"], again.results[k]["params"]) for k in first.results)
    jobs = [Job(f"f/{s}", fail_if, {"seed": s, "bad": 1}) for s in range(3)]
    report = run_sweep(jobs, cache_dir=str(tmp_path), client=client, progress=False)
    assert sorted(report.done) == ["f/0", "f/2"] and list(report.failed) == ["f/1"]
    assert "seed 1 is the bad one" in report.failed["f/1"].error and "Traceback" in report.failed["f/1"].traceback
    assert report.failed["f/1"].config == {"seed": 1, "bad": 1}
    assert "2 done, 0 cached, 1 failed" in report.summary()


def test_the_same_jobs_swept_again_on_one_client_publish_to_the_new_cache(tmp_path, client):
    """The cluster may still hold the first sweep's tasks: the second must run its own, not reuse them."""
    jobs = _grid()[:2]
    run_sweep(jobs, cache_dir=str(tmp_path / "a"), client=client, progress=False)
    second = run_sweep(jobs, cache_dir=str(tmp_path / "b"), client=client, progress=False)
    assert len(second.done) == 2
    assert all((tmp_path / "b" / job.key / "payload.json").is_file() for job in jobs)


def test_corrupt_entry_is_recomputed(tmp_path):
    jobs = _grid()[:2]
    first = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    entry = tmp_path / jobs[0].key / "payload.npz"
    entry.write_bytes(entry.read_bytes()[:50])
    again = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    assert again.done == [jobs[0].name] and again.cached == [jobs[1].name]
    assert torch.equal(again.results[jobs[0].name]["params"], first.results[jobs[0].name]["params"])


def test_bad_scheduler_address_fails_naming_it_and_the_connect_timeout():
    # This message is raised once Dask's connect timeout (CONNECT_TIMEOUT_S) has run out: no clock needed.
    timed_out = rf"scheduler='tcp://127.0.0.1:9' \(--scheduler\): no Dask scheduler answered within {CONNECT_TIMEOUT_S} s"
    with pytest.raises(InvalidArgumentError, match=timed_out):
        connect("tcp://127.0.0.1:9")
    with pytest.raises(InvalidArgumentError, match="scheduler='nowhere'"):
        connect("nowhere")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass  # the test's output is the assertion, not the server's complaints about Dask's bytes


@contextlib.contextmanager
def _listener(kind: str):
    """A loopback port that accepts TCP but is not Dask: ``closed`` (nothing listens), ``silent`` (accepts and
    never replies) or ``http`` (an HTTP server, whose reply Dask would read as a frame length)."""
    if kind == "http":
        # threaded: the handler stays blocked on the half-open Dask connection, and shutdown must not wait for it
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if kind == "closed":
        sock.close()
        yield port
        return
    sock.listen(8)
    try:
        yield port
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["closed", "silent", "http"])
def test_an_address_that_is_not_a_dask_scheduler_fails_in_one_line_naming_the_option(kind):
    with _listener(kind) as port, pytest.raises(InvalidArgumentError) as info:
        connect(f"tcp://127.0.0.1:{port}")
    message = str(info.value)
    assert message.startswith(f"scheduler='tcp://127.0.0.1:{port}' (--scheduler): no Dask scheduler")
    assert "\n" not in message and len(message) < 400


def test_a_local_cluster_listens_on_loopback_only():
    import psutil

    c = connect("local", n_workers=1)
    try:
        assert c.dashboard_link.startswith("http://127.0.0.1:")
        me = psutil.Process()
        listening = [
            conn.laddr
            for proc in [me, *me.children(recursive=True)]
            for conn in proc.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        ]
        dashboard_port = int(c.dashboard_link.split(":")[2].split("/")[0])
        assert dashboard_port in {a.port for a in listening}  # the dashboard is among what was inspected
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    finally:
        close(c)


def test_repeated_job_names_are_refused(tmp_path):
    job = _grid()[0]
    with pytest.raises(InvalidArgumentError, match="repeated names"):
        run_sweep([job, job], cache_dir=str(tmp_path), progress=False)


def test_sigkill_midway_then_resume(tmp_path):
    """Kill a sweep process with SIGKILL after some jobs finished; the rerun recomputes only the rest. Jobs from
    seed 3 on wait for a gate file that exists only after the kill, so the kill lands after exactly 3 jobs."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    gate = tmp_path / "gate"
    config = {"width": 3, "steps": 40, "gate": str(gate), "first_gated": 3}
    script = tmp_path / "sweep.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sweep_jobs import train_small_after_gate\n"
        "from fragile.run.sweep import Job, run_sweep\n"
        f"config = {config!r}\n"
        "jobs = [Job(f't/{s}', train_small_after_gate, {'seed': s, **config}) for s in range(10)]\n"
        f"run_sweep(jobs, cache_dir={str(tmp_path / 'cache')!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    cache = tmp_path / "cache" / "t"

    def published() -> set[str]:
        # An entry is published by renaming its finished temporary folder; a ".tmp-*" folder is work in flight.
        if not cache.is_dir():
            return set()
        return {job.name for job in cache.iterdir() if any(not e.name.startswith(".") for e in job.iterdir())}

    while proc.poll() is None and len(published()) < 3:  # until 3 jobs are published (or the process ended)
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = published()
    assert finished == {"0", "1", "2"}, "the kill lands while job 3 waits at the gate"

    gate.touch()
    jobs = [Job(f"t/{s}", train_small_after_gate, {"seed": s, **config}) for s in range(10)]
    resumed = run_sweep(jobs, cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(resumed.cached) == len(finished) and len(resumed.done) == 10 - len(finished) and not resumed.failed
    clean = run_sweep(jobs, cache_dir=str(tmp_path / "clean"), progress=False)
    for name in clean.results:
        assert torch.equal(clean.results[name]["params"], resumed.results[name]["params"]), name


def test_worker_that_dies_mid_job_is_retried_or_reported(tmp_path):
    """A worker process that dies mid-job: its job is rescheduled on a restarted worker; a job that kills
    every worker it lands on is reported as failed after the allowed retries, and the sweep still ends."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        c = connect("local", n_workers=2)
        try:
            ok = [Job(f"ok/{s}", train_small, {"seed": s, "width": 3, "steps": 30}) for s in range(3)]
            flaky = Job("flaky", die_once, {"marker": str(tmp_path / "died"), "value": 7})
            report = run_sweep([flaky, *ok], cache_dir=str(tmp_path / "a"), client=c, progress=False)
            assert (tmp_path / "died").exists(), "the first attempt killed its worker"
            assert not report.failed and report.results["flaky"]["value"] == 7 and len(report.done + report.cached) == 4
            doomed = Job("doomed", always_die, {})
            report = run_sweep([doomed, *ok], cache_dir=str(tmp_path / "b"), client=c, progress=False)
            assert list(report.failed) == ["doomed"] and "KilledWorker" in report.failed["doomed"].error
            # a job whose worker was killed after it had published its result is rerun and finds that result
            assert sorted(report.done + report.cached) == sorted(j.name for j in ok)
        finally:
            close(c)


def test_resource_annotations_reach_the_scheduler(tmp_path):
    """One worker with two threads and one "GPU": jobs that each need the GPU run one after the other; the
    same kind of jobs without the annotation run at the same time (each waits for the other to start), so
    the annotation, not chance, serialised them."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, resources={"GPU": 1}, dashboard_address=":0")
    client = Client(cluster)
    try:
        free = [Job(f"m/{i}", meet, {"index": i, "folder": str(tmp_path / "met"), "others": 1}) for i in range(2)]
        met = run_sweep(free, cache_dir=str(tmp_path / "free"), client=client, progress=False).results
        assert met["m/0"]["met"] and met["m/1"]["met"], "without the annotation the two jobs run at the same time"

        gpu = [Job(f"s/{i}", sleep_span, {"index": i, "seconds": 0.5}, resources={"GPU": 1}) for i in range(2)]
        r = run_sweep(gpu, cache_dir=str(tmp_path / "gpu"), client=client, progress=False).results
        first, second = sorted((r["s/0"], r["s/1"]), key=lambda span: span["start"])
        assert first["end"] <= second["start"], "with the annotation one job ends before the other starts"
    finally:
        client.close()
        cluster.close()


def test_expensive_jobs_start_first_and_run_times_are_reported(tmp_path):
    jobs = [Job(f"c/{i}", fail_if, {"seed": i, "bad": -1}, cost=c) for i, c in enumerate((1.0, 5.0, 3.0, 5.0))]
    report = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    assert report.done == ["c/1", "c/3", "c/2", "c/0"]
    assert set(report.seconds) == {j.name for j in jobs} and all(s >= 0 for s in report.seconds.values())


def test_jobs_keep_freed_memory_in_glibc_processes():
    import ctypes.util
    import resource
    import sys

    from fragile.run.allocator import keep_freed_memory

    glibc = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    if not glibc:
        assert keep_freed_memory() is False
        return
    assert keep_freed_memory() is True and keep_freed_memory() is True  # idempotent

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20

    def faults_of_a_64mb_block() -> int:
        # malloc/memset/free through ctypes, with no Python allocation in between: with torch tensors, small
        # objects allocated between two tensors can split the freed block and make the count depend on luck.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)  # touch every page
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_64mb_block()
    # Freed memory is reused: the second block touches pages the process already has. glibc's default
    # (mmap above at most 32 MB) would unmap the block on free and fault in all 16,384 pages again.
    assert faults_of_a_64mb_block() < 1000


def test_a_local_sweep_joins_the_cluster_the_runner_shares(tmp_path, client, monkeypatch):
    from fragile.run.sweep import SHARED_SCHEDULER_ENV

    monkeypatch.setenv(SHARED_SCHEDULER_ENV, client.scheduler.address)
    report = run_sweep(_grid(steps=5)[:2], cache_dir=str(tmp_path), scheduler="local", progress=False)
    workers = set(client.run(os.getpid).values())
    assert not report.failed and {r["pid"] for r in report.results.values()} <= workers
