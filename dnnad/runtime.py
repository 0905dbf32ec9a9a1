"""Ray start-up, cluster resources and the console: dnnad's stage lines and one progress bar per stage;
Ray's own logs go to its log files unless ``--verbose``."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager


class Stopped(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, ``kill``, a scheduler) or SIGINT raised in the driver: the job unwinds as on
    Ctrl-C. ``args[0]`` is the signal's number."""


_received: int | None = None  # the first stop signal this process received: honoured at the next partition


def _stop(signum, frame):
    global _received
    _received = signum if _received is None else _received
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGTERM (Ray's own handler would abort the process) and SIGINT raise ``Stopped`` in the driver's main
    thread, and are remembered: a KeyboardInterrupt that lands inside Ray's own code can be swallowed there
    (seen once in CI: a Ctrl-C'd job ran to completion), so ``check_stopped`` raises it again."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)


def reset_stops() -> None:
    """Forget earlier stop signals: a new job in this process starts unstopped."""
    global _received
    _received = None


def check_stopped() -> None:
    """Raise ``Stopped`` if a stop signal arrived (between partitions, where a swallowed one is caught)."""
    if _received is not None:
        raise Stopped(_received)


OWNER_ENV = "DNNAD_RAY_OWNER"  # inherited by every process of a Ray this job started: how stop_ray finds them


def start_ray(quiet: bool = False, verbose: bool = False) -> bool:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start Ray in-process; True when this
    call started it (then ``stop_ray`` ends it and every process it started).

    Unless ``verbose``, Ray's own console output (its Python and C++ logs, which include an ERROR line
    that Ray Data's restartable actor pools always trigger, ray-project/ray#53727) goes to a log file;
    dnnad's stage lines, progress bars and errors stay on the console.
    """
    import ray

    if quiet:  # under cron every line is mail: Ray's own Python warnings stay off the console too
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    if not verbose:
        quiet_ray_data_console()
    started = not ray.is_initialized()
    if started:
        if not verbose:
            log = send_ray_console_to_file()
            if not quiet:
                print(f"[dnnad] Ray's logs: {log}", file=sys.stderr, flush=True)
        remote = bool(os.environ.get("RAY_ADDRESS"))
        started = not remote
        if started:
            os.environ[OWNER_ENV] = f"{os.getpid()}-{uuid.uuid4().hex}"
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=verbose,
                 include_dashboard=None if remote else False,
                 logging_level=logging.INFO if verbose else logging.ERROR)
        stop_on_signals()  # ray.init installs a C++ handler that dumps a stack and aborts
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = verbose
    return started


def stop_ray(timeout: float = 20.0) -> list[int]:
    """Shut down the Ray this process started and end every process it started, however they were reparented
    (a worker starting while its raylet shuts down outlives it, its parent init): they carry ``OWNER_ENV``.
    Returns the pids that had to be killed."""
    import psutil
    import ray

    token = os.environ.pop(OWNER_ENV, None)
    ray.shutdown()
    if token is None:
        return []

    def ours() -> list:
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(OWNER_ENV) == token:
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    left = ours()
    _, alive = psutil.wait_procs(left, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def quiet_ray_data_console() -> None:
    """Ray Data's logging configuration with its console handler at ERROR: its INFO/WARNING lines still
    reach ray-data.log in the session's log folder. Ray Data re-reads RAY_DATA_LOGGING_CONFIG per dataset."""
    if "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return  # the user's own configuration wins
    try:
        from ray.data._internal.logging import DEFAULT_CONFIG
    except ImportError:
        return
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.get("handlers", {}).get("console", {})["level"] = "ERROR"
    path = os.path.join(tempfile.gettempdir(), "dnnad-logs", "ray-data-logging.json")  # JSON is YAML
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f)
    os.replace(path + ".tmp", path)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = path


def send_ray_console_to_file() -> str:
    """Point file descriptor 2 (where Ray's C++ and early Python logs go) at a log file, and keep
    ``sys.stderr`` (dnnad's lines, progress bars, tracebacks) on the console. Returns the log path."""
    path = os.path.join(tempfile.gettempdir(), "dnnad-logs", f"ray-driver-{os.getpid()}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    console = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(console, "w", buffering=1)
    return path


def resolved(ref):
    """The value behind an object-store ref (actor state shared by every actor), or ``ref`` itself."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the running cluster."""
    import ray

    res = ray.cluster_resources()
    return max(1, int(res.get("CPU", 1))), int(res.get("GPU", 0))


def files_reach_every_actor() -> bool:
    """Whether a local file the driver opens is there for every actor, so a model's memory-mapped shards may
    travel as their paths: Ray runs on this machine alone, started here rather than joined through
    ``RAY_ADDRESS`` (a cluster may add hosts after this check, as autoscalers do)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return False
    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))


# The query path streams read → embed → score at once, so Ray's logical CPUs are planned here, in one place:
# Ray Data's file listing and read tasks ask for 1 CPU each and must stay schedulable beside the actor pools,
# so the pools leave READ_RESERVE_CPUS free; each actor sets its own thread count for the real work.
READ_RESERVE_CPUS = 1.0
SCORE_ACTOR_CPUS = 0.25
FINAL_POOL_CPUS = 0.05  # with shard groups, the pool that only turns merged neighbours into output rows
# On GPU clusters every GPU holds one embedding actor and one scoring actor (FAISS on the GPU) side by side,
# so neither pool can take all GPUs and starve the other stage of the streaming pipeline.
SCORE_ACTOR_GPUS = 0.25
EMBED_ACTOR_GPUS = 1.0 - SCORE_ACTOR_GPUS


MAX_SCORE_ACTORS = 8


def score_pool(cpus: int, actors: int | None) -> tuple[int, int]:
    """(scoring actors, FAISS threads per actor).

    By default one single-threaded actor per CPU (up to MAX_SCORE_ACTORS, then threads): every actor maps
    the same shards from the object store, so more actors cost no index memory, and independent processes
    keep every core busy where one multi-threaded search stalls at its OpenMP barriers whenever a core is
    taken by a read or write task (measured on 2 cores: 2 actors x 1 thread 0.95-1.0x raw FAISS, 1 actor x 2
    threads 0.55x, with the same reads and writes running beside them).
    """
    n = actors or max(1, min(MAX_SCORE_ACTORS, cpus))
    return n, max(1, cpus // n)


MAX_EMBED_ACTORS = 8


def embed_pool(cpus: int, actors: int | None, threads: int | None, score_actors: int | None = None
               ) -> tuple[int, int, float]:
    """(CPU embedding actors, torch threads per actor, logical CPUs per actor).

    By default one single-threaded actor per CPU (up to MAX_EMBED_ACTORS, then more threads each), as for
    scoring: a small image's forward pass barely parallelises inside one process, and independent processes
    do not wait on each other (measured on 2 cores, Lite0 at 32 px: 2 actors x 1 thread 1.8x the images/s of
    one plain 2-thread loop; 1 actor x 2 threads 0.91x)."""
    if actors and not threads:
        threads = max(1, cpus // actors)
    n = actors or max(1, min(MAX_EMBED_ACTORS, cpus // (threads or 1)))
    threads = threads or max(1, cpus // n)
    free = cpus - READ_RESERVE_CPUS - SCORE_ACTOR_CPUS * score_pool(cpus, score_actors)[0]
    return n, threads, max(0.25, min(float(threads), free / n))


class Timings(dict):
    """Seconds per stage, in the order the stages ran; prints one line per stage unless quiet."""

    def __init__(self, quiet: bool = False):
        super().__init__()
        self.quiet = quiet

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t0, 3)
        self.say(f"{name}: {self[name]:.1f}s")

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"[dnnad] {line}", file=sys.stderr, flush=True)
