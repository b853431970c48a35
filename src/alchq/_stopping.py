"""How a worker stops: stop requests, signals, the grace period, interrupts, last resorts.

::

    stop()                 claim nothing more; the task in hand finishes
    SIGTERM / SIGINT       the same, and the grace period starts
    again, or grace over   stop now: WorkerShutdown is raised into run(), the
                           task goes back to PENDING, the worker exits 1
    time limit             TaskTimeoutError is raised into run()
    still running after    (kill_after) the monitor ends the claim itself, then
    an interrupt           replaces the process (time limit) or exits (shutdown)

Interrupts reach the main thread through SIGALRM (which also wakes it from
blocking calls) and other threads through an asynchronous exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from alchq._held import Held, WorkerShutdown
from alchq._monitor import Monitor
from alchq._outcome import RELEASE, Kind, Outcome, failed
from alchq._recorder import Recorder
from alchq._util import helper_thread
from alchq.config import Settings
from alchq.exceptions import TaskCancelled, TaskTimeoutError

logger = logging.getLogger("alchq.worker")

#: Exit status of a worker stopped before the task in hand finished.
EXIT_INTERRUPTED = 1


class Stopper:
    """The stop state of one worker, and everything that acts on it."""

    def __init__(
        self,
        monitor: Monitor,
        recorder: Recorder,
        settings: Settings,
        app_context: Callable[[], contextlib.AbstractContextManager[Any]],
        wake: Callable[[], None],
    ) -> None:
        self.monitor = monitor
        self._wake = wake
        self.recorder = recorder
        self.settings = settings
        self.app_context = app_context
        #: Set once the worker must claim nothing more.
        self.event = threading.Event()
        #: Set once the worker must stop now (not only after the task in hand).
        self.aborted = False
        self._grace_over = threading.Event()
        self._grace_timer: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self.event.is_set()

    def stop(self) -> None:
        """Claim nothing more; the task in hand finishes (thread- and signal-safe)."""
        self.event.set()
        self._wake()

    def stop_within(self, grace: float) -> None:
        """Stop; the task in hand has ``grace`` seconds to finish, then is stopped now."""
        self.stop()
        if self._grace_timer is None:

            def timer() -> None:
                if not self._grace_over.wait(grace):
                    self.grace_expired()

            self._grace_timer = helper_thread(timer, "alchq-grace")

    def close(self) -> None:
        self._grace_over.set()

    def grace_expired(self) -> None:
        held = self.monitor.held
        if held is not None:
            logger.warning(
                "%s did not finish within the %.0fs grace period",
                held.label,
                self.settings.grace_period,
            )
            self.stop_now("grace period over")

    def stop_now(self, why: str) -> None:
        """Stop at once: interrupt the task in hand; the monitor makes sure within kill_after."""
        self.aborted = True
        self.stop()
        held = self.monitor.held
        if held is None:
            return
        logger.warning("%s: stopping now (%s); the task goes back to PENDING", held.label, why)
        held.interrupt = "shutdown"
        held.hard_deadline = time.monotonic() + self.settings.kill_after
        if threading.get_ident() == held.thread_id and held.in_run:
            held.in_run = False
            raise WorkerShutdown()
        self.interrupt(held, WorkerShutdown)

    def interrupt(self, held: Held, exc_type: type[BaseException]) -> None:
        if not held.in_run:
            return  # between run() and its outcome: let the write finish
        if held.thread_id == threading.main_thread().ident:
            send_alarm(held.thread_id)
        else:
            interrupt_thread(held.thread_id, exc_type)

    def time_limit_reached(self, held: Held) -> None:
        """Monitor thread: the task overran its time limit; interrupt it."""
        logger.warning(
            "%s exceeded its time limit of %gs; interrupting it", held.what, held.time_limit
        )
        held.interrupt = "timeout"
        held.hard_deadline = time.monotonic() + self.settings.kill_after
        self.interrupt(held, TaskTimeoutError)

    def cancel_requested(self, held: Held) -> None:
        """Monitor thread: the task in hand was cancelled while running; interrupt it."""
        if held.interrupt is not None or held.phase != "run" or not held.in_run:
            return  # already stopping, or run() is over: its outcome is being written
        logger.warning("%s was cancelled; interrupting it", held.label)
        held.interrupt = "cancel"
        held.hard_deadline = time.monotonic() + self.settings.kill_after
        self.interrupt(held, TaskCancelled)

    def hard_deadline_reached(self, held: Held) -> None:
        """Monitor thread: the task did not stop when interrupted; end the process.

        The claim is ended first (a run: its timeout recorded, retried by its
        policy; a shutdown: released). An error() stopped this way keeps its
        lease: the replacement process calls it again.
        """
        if held.interrupt == "cancel":
            logger.error("%s could not be interrupted; replacing the worker process", held.what)
            cancelled = TaskCancelled(f"{held.label} was cancelled and could not be interrupted")
            self.recorder.finish_elsewhere(held, Outcome(Kind.CANCELLED, cancelled))
            replace_process(held.worker_id)
        elif held.interrupt == "timeout":
            logger.error("%s could not be interrupted; replacing the worker process", held.what)
            if held.phase == "run":
                exc = TaskTimeoutError(
                    f"{held.label} ran longer than its time limit of {held.time_limit:g}s and "
                    "could not be interrupted; its worker process was replaced"
                )
                self.recorder.finish_elsewhere(held, failed(held, exc, None))
            replace_process(held.worker_id)
        else:
            logger.error("%s could not be interrupted; exiting now", held.what)
            if held.phase == "run":
                self.recorder.finish_elsewhere(held, RELEASE)
            exit_now(EXIT_INTERRUPTED)

    @contextlib.contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM/SIGHUP stop the worker gracefully; SIGALRM delivers interrupts.

        Only the main thread can receive signals; elsewhere the worker relies
        on :meth:`stop` and the monitor thread.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[signal.Signals, Any] = {}

        def on_stop(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            held = self.monitor.held
            if not self.stopping:
                # The grace clock starts now, whatever the worker is doing: a
                # task it claims from here on is released at once, not run.
                self.stop_within(self.settings.grace_period)
                if held is None:
                    logger.info("%s received, stopping", name)
                    return
                logger.info(
                    "%s received: finishing %s within %.0fs, then stopping (again to stop now)",
                    name,
                    held.label,
                    self.settings.grace_period,
                )
                return
            self.stop_now(f"{name} received again")

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            held = self.monitor.held
            if (
                held is not None
                and held.interrupt is None
                and held.in_run
                and time.monotonic() - held.started >= held.time_limit
            ):
                # Past its limit before the monitor thread could say so (a task
                # holding the interpreter starves it): the supervisor's alarm.
                held.interrupt = "timeout"
                held.hard_deadline = time.monotonic() + self.settings.kill_after
            if held is not None and held.interrupt == "timeout" and held.in_run:
                held.in_run = False  # raise once
                raise TaskTimeoutError(
                    f"{held.what} ran longer than its time limit of {held.time_limit:g}s"
                )
            if held is not None and held.interrupt == "cancel" and held.in_run:
                held.in_run = False
                raise TaskCancelled(f"{held.label} was cancelled")
            if held is not None and held.interrupt == "shutdown" and held.in_run:
                held.in_run = False
                raise WorkerShutdown()
            chained = previous.get(signal.SIGALRM)
            if callable(chained):
                chained(signum, frame)

        # SIGHUP (a closed terminal, a supervisor's reload) stops the worker
        # gracefully too, rather than killing it mid-task.
        for sig, handler in (
            (signal.SIGINT, on_stop),
            (signal.SIGTERM, on_stop),
            (signal.SIGHUP, on_stop),
            (signal.SIGALRM, on_alarm),
        ):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def interrupt_thread(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in another thread at its next Python instruction."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
    )


def send_alarm(thread_id: int) -> None:
    """Deliver SIGALRM to the main thread (wakes it from sleeps and blocking calls)."""
    signal.pthread_kill(thread_id, signal.SIGALRM)


#: Set for a worker process that replaced itself: the id of the worker it was.
#: Its claims and error() calls are taken over at once, not after a lease.
REPLACED_ENV = "ALCHQ_REPLACED_WORKER"


def replace_process(worker_id: str) -> None:
    """Start this worker anew in the same process (same pid, same command line)."""
    os.environ[REPLACED_ENV] = worker_id
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execv(sys.executable, argv)  # noqa: S606 - re-running our own command line


def exit_now(code: int) -> None:
    """Leave at once, without running Python cleanup (the main thread is stuck)."""
    for handler in logging.getLogger().handlers + logging.getLogger("alchq").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: S110 - best effort while exiting
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
