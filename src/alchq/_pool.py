"""The worker processes of ``alchq run`` (and ``flask alchq run``), under a supervisor.

The command is always a supervisor: it first checks, in-process, what every
worker would trip over at once (the models, the database, the tables), then
runs its own command line again with ``ALCHQ_POOL_CHILD`` set, which makes the
child a worker process: one plain worker (``--pool processes``, N children
for ``--concurrency N``) or N worker threads (``--pool threads``, one child).
Re-executing rather than forking means no connection, lock or thread is
inherited, and it works alike for ``alchq``, ``python -m alchq`` and
``flask alchq``.

Being a separate process, the supervisor cannot be starved by a task that
holds the interpreter: it keeps the workers' leases and time limits (see
:mod:`alchq._keeper`). Children get a session of their own, so a Ctrl-C on the
terminal reaches only the supervisor, which passes on exactly one SIGTERM per
signal it receives (a worker takes a second signal as "stop now"). A child
dies with its supervisor (Linux: at once, by the kernel) and stops with it
when the supervisor is stopped (SIGSTOP).

A worker that dies is reported in one line and replaced (its claims taken
over at once by its replacement), unless workers keep dying within seconds of
starting with nothing in hand: then the supervisor gives up.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from alchq._binds import Binds
from alchq._commands import run_worker
from alchq._keeper import Child, Keeper
from alchq._link import ADOPT_ENV, FD_ENV, SUPERVISOR_PID_ENV
from alchq._liveness import is_stopped
from alchq._registry import SUPERVISOR_ENV as SUPERVISOR_ID_ENV
from alchq._util import first_line, helper_thread
from alchq.exceptions import AlchqError, ConfigurationError
from alchq.model import BaseQueue, task_table
from alchq.worker import Worker

__all__ = ["CONCURRENCY_ENV", "POOLS", "error_status", "run_pool"]

logger = logging.getLogger("alchq.pool")

POOLS = ("processes", "threads")
#: Set for worker processes whose supervisor serves metrics: they count events.
METRICS_ENV = "ALCHQ_METRICS_CHILD"
#: Default number of workers when ``--concurrency`` is not given.
CONCURRENCY_ENV = "ALCHQ_CONCURRENCY"
#: Set in a child: its number (1..N). Makes the command one plain worker.
CHILD_ENV = "ALCHQ_POOL_CHILD"
#: Set in a child: the supervisor's pid, to notice when it is gone.
SUPERVISOR_ENV = SUPERVISOR_PID_ENV
#: Set in a child of ``--pool threads``: how many worker threads it runs.
THREADS_ENV = "ALCHQ_POOL_THREADS"
#: The exit status of a child that could not start (a configuration problem):
#: not replaced, the supervisor stops (sysexits' EX_CONFIG).
EXIT_CONFIG = 78

#: A worker that ends within this many seconds of starting died "quickly" (a
#: child needs a few seconds to import on a busy machine)...
QUICK_DEATH = 10.0
#: ...and after this many quick deaths in a row the pool gives up.
MAX_QUICK_DEATHS = 5
#: How often the supervisor looks at its workers (seconds).
_TICK = 0.1

#: Runs one worker, calling its argument with the Worker once built.
RunOne = Callable[[Callable[[Worker], object]], object]


def concurrency_from(option: int | None) -> int:
    """The number of workers: the option, else ``$ALCHQ_CONCURRENCY``, else 1."""
    if option is None:
        raw = os.environ.get(CONCURRENCY_ENV, "").strip()
        if not raw:
            return 1
        try:
            option = int(raw)
        except ValueError:
            option = 0
        if option < 1:
            raise ConfigurationError(f"{CONCURRENCY_ENV} must be a whole number >= 1, got {raw!r}")
    if option < 1:
        raise ConfigurationError(f"concurrency must be 1 or more, got {option}")
    return option


def error_status() -> int:
    """The exit status of a command that failed with a clear error: 1, or in a worker
    process :data:`EXIT_CONFIG`, which tells its supervisor not to start another."""
    return EXIT_CONFIG if os.environ.get(CHILD_ENV) else 1


def run_pool(
    models: Sequence[type[BaseQueue]],
    *,
    concurrency: int | None,
    pool: str,
    burst: bool,
    max_tasks: int | None,
    metrics_port: int | None = None,
    **worker_kwargs: Any,
) -> int:
    """Run the workers of ``alchq run``; return the command's exit status.

    ``metrics_port``: the supervisor serves Prometheus metrics there, its
    workers' counters included (see :mod:`alchq.metrics`).
    """
    forever = not burst and max_tasks is None
    # The marker stays in the environment: a child that replaces itself
    # (a task that could not be interrupted) must come back as a child.
    if os.environ.get(CHILD_ENV):
        _tie_to_supervisor()
        if os.environ.get(METRICS_ENV):
            from alchq.metrics import track_events

            track_events()
        threads = int(os.environ.get(THREADS_ENV) or 0)
        if not threads:
            run_worker(
                models, burst=burst, max_tasks=max_tasks, started=_watch_supervisor, **worker_kwargs
            )
            return 0
        probe = Worker(*models, **worker_kwargs)

        def run_one(started: Callable[[Worker], object]) -> None:
            # Each thread its own worker, sessions and (Flask) app context.
            with probe.app_context():
                run_worker(
                    models, burst=burst, max_tasks=max_tasks, started=started, **worker_kwargs
                )

        supervisor = _Supervisor(
            threads, lambda index: _Thread(index, run_one), forever=forever, kind="threads"
        )
        return supervisor.run()
    size = concurrency_from(concurrency)
    if pool not in POOLS:
        raise ConfigurationError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    probe = Worker(*models, **worker_kwargs)  # checks the models and settings
    _preflight(probe)
    if metrics_port is not None:
        from alchq.metrics import prepare_worker_metrics, serve_worker_metrics

        prepare_worker_metrics()
        os.environ[METRICS_ENV] = "1"
        serve_worker_metrics(
            metrics_port, probe.models, probe.source.open, context=probe.app_context
        )
    keeper = Keeper(probe.models, probe.source, probe.settings)
    threads = size if pool == "threads" else 0

    def spawn(index: int, adopt: Sequence[str]) -> _Member:
        return _Process(index, keeper, threads, adopt)

    names = ", ".join(m.__name__ for m in models)
    if size > 1:
        logger.info("starting %d worker %s for %s", size, pool, names)
    processes = 1 if threads else size
    return _Supervisor(processes, spawn, forever=forever, kind="processes", keeper=keeper).run()


def _preflight(worker: Worker) -> None:
    """Fail once, before any worker starts, on what all of them would fail on at once.

    An unreachable database or a missing table is reported as the plain
    command reports it; other database errors are left to the workers, which
    wait out a server that is starting up.
    """
    binds = Binds(worker.source)
    for model in worker.models:
        session = worker.source.open()
        try:
            engine = binds.engine(session, model)
            try:
                with engine.connect() as conn:
                    conn.execute(select(*task_table(model).primary_key.columns).limit(1))
            except DBAPIError as exc:
                problem = binds.diagnose(exc, model, engine)
                if isinstance(problem, AlchqError):
                    raise problem from exc
            # Process children open their own connections: keep none here.
            engine.dispose()
        finally:
            worker.source.release(session)


# -- stopping one Worker, as its own signal handler would ------------------------------------


def _stop_gracefully(worker: Worker) -> None:
    """A first SIGTERM: claim nothing more; the task in hand has the grace period."""
    worker.stop(within=worker.settings.grace_period)


#: Linux's prctl(PR_SET_PDEATHSIG): a signal for this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _tie_to_supervisor() -> None:
    """In a child: die with the supervisor, as a single-process worker would.

    Killing the command (``kill -9``) must end its tasks as it ends a plain
    process's, leaving them to their leases, not let them run on unsupervised.
    """
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the watch thread below stops the worker instead
    if supervisor and os.getppid() != supervisor:
        os._exit(1)  # the supervisor died before the tie was made


def _watch_supervisor(worker: Worker) -> None:
    """In a child: stop when the supervisor is gone; freeze while it is stopped."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or 0)

    def watch() -> None:
        # Orphans are adopted by another process: the parent pid changes.
        while os.getppid() == supervisor:
            if is_stopped(supervisor):
                # The command was stopped (SIGSTOP, a frozen container): so is its
                # worker. The supervisor sends SIGCONT when it is continued.
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.2)
        logger.warning("the supervisor (pid %d) is gone; stopping", supervisor)
        _stop_gracefully(worker)

    helper_thread(watch, "alchq-supervisor-watch")


# -- the pool's members ----------------------------------------------------------------------


class _Member(Protocol):
    index: int
    started: float
    name: str

    def poll(self) -> int | None:
        """The exit status once ended (negative: killed by that signal), else None."""

    def how(self, status: int) -> str:
        """How it ended, for a log line: ``killed by SIGKILL``, ``exit status 3``..."""

    def stop(self, now: bool, why: str) -> None:
        """Pass on a stop request: the first, or a later one (stop now, because ``why``)."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _Process:
    """A child process running the command line of the supervisor."""

    def __init__(self, index: int, keeper: Keeper, threads: int, adopt: Sequence[str]) -> None:
        self.index = index
        self.started = time.monotonic()
        self.keeper = keeper
        read, write = keeper.pipe()
        env = {
            **os.environ,
            CHILD_ENV: str(index),
            SUPERVISOR_ENV: str(os.getpid()),
            SUPERVISOR_ID_ENV: f"{socket.gethostname()}:{os.getpid()}",
            FD_ENV: str(write),
        }
        if threads:
            env[THREADS_ENV] = str(threads)
        if adopt:
            env[ADOPT_ENV] = ",".join(adopt)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, *sys.orig_argv[1:]],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(write,),
                start_new_session=True,  # terminal signals reach the supervisor only
            )
        finally:
            os.close(write)
        self.child = Child(self.proc.pid, read)
        self.name = f"worker process {index} (pid {self.proc.pid})"
        logger.info("%s started", self.name)

    def poll(self) -> int | None:
        return self.proc.poll()

    def held_anything(self) -> bool:
        """Did it die holding a task (the task's doing, not a crash at start)?"""
        return bool(self.child.held)

    def how(self, status: int) -> str:
        if status < 0:
            return f"killed by {_signal_name(-status)}"
        return f"exit status {status}"

    def stop(self, now: bool, why: str) -> None:
        # send_signal() does nothing once the child was reaped (no pid reuse).
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        if now:
            self.child.stop_now_at = time.monotonic()

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)


class _Thread:
    """A worker in a thread of the supervisor."""

    def __init__(self, index: int, run_one: RunOne) -> None:
        self.index = index
        self.started = time.monotonic()
        self.name = f"worker thread {index}"
        self._run_one = run_one
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._stops = 0
        self._status: int | None = None
        self._error: BaseException | None = None
        logger.info("%s started", self.name)
        self._thread = helper_thread(self._main, f"alchq-worker-{index}")

    def _main(self) -> None:
        try:
            self._run_one(self._started)
            self._status = 0
        except SystemExit as exc:  # a worker stopped before its task finished
            self._status = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            self._error, self._status = exc, 1
            logger.debug("%s traceback", self.name, exc_info=True)

    def _started(self, worker: Worker) -> None:
        with self._lock:
            self._worker = worker
            if self._stops:  # asked to stop before the worker existed
                worker.stop()

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self._status

    def how(self, status: int) -> str:
        if self._error is not None:
            return f"{type(self._error).__name__}: {first_line(self._error)}"
        return f"exit status {status}"

    def stop(self, now: bool, why: str) -> None:
        with self._lock:
            self._stops += 1
            worker = self._worker
        if worker is None:
            return
        if now:
            worker.stop(now=True, why=why)
        else:
            _stop_gracefully(worker)


# -- the supervisor ----------------------------------------------------------------------------


class _Supervisor:
    """Keeps ``size`` members running until they are done or asked to stop."""

    def __init__(
        self,
        size: int,
        spawn: Callable[..., _Member],
        *,
        forever: bool,
        kind: str,
        keeper: Keeper | None = None,
    ) -> None:
        self.size = size
        self.spawn = spawn
        self.forever = forever
        self.kind = kind
        self.keeper = keeper
        self._requests: list[str] = []  # stop requests, e.g. "SIGTERM received"
        self._passed_on = 0
        self._resumed = False

    @property
    def stopping(self) -> bool:
        return bool(self._requests)

    def run(self) -> int:
        members: dict[int, _Member] = {}
        with self._signal_handlers():
            try:
                return self._supervise(members)
            finally:
                # Only after an unexpected error: don't leave workers behind.
                for member in members.values():
                    if member.poll() is None:
                        member.stop(False, "the supervisor failed")

    def _new(self, index: int, adopt: Sequence[str] = ()) -> _Member:
        return self.spawn(index, adopt) if self.keeper is not None else self.spawn(index)

    def _supervise(self, members: dict[int, _Member]) -> int:
        for index in range(1, self.size + 1):
            members[index] = self._new(index)
        final: dict[int, int] = {}  # each slot's last exit status
        due: dict[int, float] = {}  # slots to refill, and when
        adopt: dict[int, list[str]] = {}  # workers a slot's next process takes over
        quick = 0
        failure: str | None = None
        config_error = False
        while members or (due and not self.stopping):
            self._pass_on_stops(members)
            self._resume(members)
            if self.keeper is not None:
                self.keeper.tick([m.child for m in members.values() if isinstance(m, _Process)])
            now = time.monotonic()
            for index, member in list(members.items()):
                status = member.poll()
                if status is None:
                    continue
                del members[index]
                task_caused = False
                if isinstance(member, _Process) and self.keeper is not None:
                    self.keeper.read(member.child)
                    task_caused = member.held_anything()
                    adopt[index] = self.keeper.gone(member.child)
                if status == EXIT_CONFIG:
                    # It could not start, and said why: so would every other.
                    config_error = True
                    final[index] = 1
                    self._requests.append("a worker could not start")
                    continue
                # A worker killed by our own SIGTERM had no task in hand (its
                # handlers were not installed yet): a clean stop.
                clean = status == 0 or (self.stopping and status == -signal.SIGTERM)
                final[index] = 0 if clean else status
                if self.stopping or (clean and not self.forever):
                    if not clean:
                        logger.warning("%s ended (%s)", member.name, member.how(status))
                    continue
                ended = f"died ({member.how(status)})" if status else "stopped"
                # Dying at a task (it ended its process) is the task's doing, bounded
                # by its lost claims; dying again and again right at start is not.
                if not task_caused:
                    quick = quick + 1 if now - member.started < QUICK_DEATH else 0
                if quick >= MAX_QUICK_DEATHS:
                    failure = (
                        f"{member.name} {ended}; {quick} {self.kind} in a row "
                        f"ended within {QUICK_DEATH:g}s of starting: giving up"
                    )
                    self._requests.append("giving up")
                    continue
                # Back off while they keep dying: 0, 1, 2, 4 s...
                delay = 0.0 if quick <= 1 or task_caused else float(2 ** (quick - 2))
                later = f" in {delay:g}s" if delay else ""
                logger.warning("%s %s; starting a new one%s", member.name, ended, later)
                due[index] = now + delay
            if self.stopping:
                due.clear()
            for index, when in list(due.items()):
                if now >= when:
                    del due[index]
                    members[index] = self._new(index, adopt.pop(index, []))
            if members or due:
                time.sleep(_TICK)
        if failure is not None:
            raise AlchqError(failure)
        if config_error:
            return 1
        return 0 if all(status == 0 for status in final.values()) else 1

    def _resume(self, members: dict[int, _Member]) -> None:
        """After the supervisor was stopped and continued: so are its worker processes."""
        if self._resumed:
            self._resumed = False
            for member in members.values():
                if isinstance(member, _Process):
                    member.resume()

    def _pass_on_stops(self, members: dict[int, _Member]) -> None:
        """One stop request to each member per request received (the second: stop now)."""
        while self._passed_on < len(self._requests):
            why = self._requests[self._passed_on]
            self._passed_on += 1
            now = self._passed_on > 1
            if now:
                logger.warning("%s again: stopping the %s now", why, self.kind)
            else:
                logger.info(
                    "%s: stopping the worker %s (%d running; again to stop now)",
                    why,
                    self.kind,
                    len(members),
                )
            for member in members.values():
                member.stop(now, f"{why} again")

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_stop(signum: int, frame: FrameType | None) -> None:
            # Only note it: the loop passes it on (never half-way through a spawn).
            self._requests.append(f"{_signal_name(signum)} received")

        def on_continue(signum: int, frame: FrameType | None) -> None:
            self._resumed = True

        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, on_stop) for sig in stops}
        previous[signal.SIGCONT] = signal.signal(signal.SIGCONT, on_continue)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
