"""Start and stop a throwaway PostgreSQL server for the test-suite.

Stdlib only.  Usage::

    with PgServer() as pg:
        pg.createdb("alchq_test")
        engine = create_engine(pg.url("alchq_test"))

Binaries are looked up in ``$ALCHQ_PG_BINDIR``, then ``pg_config --bindir``,
then the newest ``/usr/lib/postgresql/*/bin``, then ``initdb`` on ``PATH``.

PostgreSQL refuses to run as root, so when running as root the server
processes are run as the ``postgres`` user (via ``runuser``, or ``su``).

Run ``python tests/pgserver.py`` to start a server for manual debugging.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

__all__ = ["PgServer", "find_bindir"]

_CMD_TIMEOUT = 120.0
_START_ATTEMPTS = 5
_LOG_TAIL_LINES = 40
_PORT_IN_USE_MARKERS = (
    "could not bind",
    "address already in use",
    "could not create any tcp/ip sockets",
    "is another postmaster already running on port",
)


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``."""
    version = os.path.basename(os.path.dirname(path))
    return tuple(int(p) for p in re.findall(r"\d+", version))


def find_bindir() -> str:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``psql``."""
    env = os.environ.get("ALCHQ_PG_BINDIR")
    if env:
        if not os.path.isfile(os.path.join(env, "initdb")):
            raise RuntimeError(f"ALCHQ_PG_BINDIR={env!r} does not contain initdb")
        return env

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and os.path.isfile(os.path.join(out, "initdb")):
            return out

    candidates = [
        d
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.path.isfile(os.path.join(d, "initdb"))
    ]
    if candidates:
        return max(candidates, key=_version_key)

    initdb = shutil.which("initdb")
    if initdb is not None:
        return os.path.dirname(os.path.realpath(initdb))

    raise RuntimeError("could not find PostgreSQL binaries (initdb); set ALCHQ_PG_BINDIR")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """The environment without libpq/server variables that could interfere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    return env


class PgServer:
    """A throwaway PostgreSQL server living in a fresh temporary directory."""

    port: int
    datadir: str

    def __init__(self, bindir: str | None = None, *, durable: bool = False) -> None:
        self.bindir: str = bindir if bindir is not None else find_bindir()
        #: PostgreSQL's default durability (benchmarks); tests run without fsync.
        self.durable = durable
        self.port = 0
        self.datadir = ""
        self.tmpdir: str = ""
        self.sockdir: str = ""
        self.logfile: str = ""
        self._running = False
        self._run_as: str | None = None

    # ------------------------------------------------------------------ helpers

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _as_server_user(self, argv: list[str]) -> list[str]:
        """Wrap *argv* so it runs as the unprivileged server user if needed."""
        if self._run_as is None:
            return argv
        runuser = shutil.which("runuser")
        if runuser is not None:
            return [runuser, "-u", self._run_as, "--", *argv]
        su = shutil.which("su") or "su"
        return [su, self._run_as, "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _run(
        self, argv: list[str], *, check: bool = True, server_user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if server_user:
            argv = self._as_server_user(argv)
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=self.tmpdir or None,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            timeout=_CMD_TIMEOUT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"command failed ({proc.returncode}): {shlex.join(argv)}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
                f"{self._log_tail_section()}"
            )
        return proc

    def _server_options(self) -> str:
        fast = (
            []
            if self.durable
            else [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        )
        return shlex.join(
            [
                "-p", str(self.port),
                "-k", self.sockdir,
                "-c", "listen_addresses=127.0.0.1",
                *fast,
                "-c", "max_connections=200",
                "-c", "shared_buffers=128MB",
            ]
        )  # fmt: skip

    def _read_log(self, offset: int = 0) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return ""

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.logfile)
        except OSError:
            return 0

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last *lines* lines of the server log."""
        return "\n".join(self._read_log().splitlines()[-lines:])

    def _log_tail_section(self) -> str:
        tail = self.log_tail() if self.logfile else ""
        return f"\nserver log ({self.logfile}):\n{tail}" if tail else ""

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, from ``postmaster.pid`` (or None)."""
        if not self.datadir:
            return None
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- lifecycle

    def _setup_user(self) -> None:
        if os.geteuid() != 0:
            self._run_as = None
            return
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root but there is no 'postgres' user to run the server as"
            ) from None
        self._run_as = pw.pw_name
        for path in (self.tmpdir, self.sockdir):
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self) -> PgServer:
        """Create a fresh cluster and start the server.  Returns ``self``."""
        if self._running:
            return self
        self.tmpdir = tempfile.mkdtemp(prefix="alchq-pg-")
        self.datadir = os.path.join(self.tmpdir, "data")
        self.sockdir = os.path.join(self.tmpdir, "sock")
        self.logfile = os.path.join(self.tmpdir, "server.log")
        os.mkdir(self.sockdir, 0o700)
        # Registered before anything can fail, so the temp dir is always
        # removed (and a half-started server stopped) at interpreter exit.
        self._running = True
        atexit.register(self.stop)
        try:
            self._setup_user()
            self._run(
                [
                    self._bin("initdb"),
                    "-D", self.datadir,
                    "--auth=trust",
                    "-U", "postgres",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            )  # fmt: skip
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self) -> None:
        last = ""
        for _ in range(_START_ATTEMPTS):
            self.port = _free_port()
            offset = self._log_size()
            proc = self.pg_ctl(
                "-w", "-t", "60", "-l", self.logfile,
                "start", "-o", self._server_options(),
                check=False,
            )  # fmt: skip
            if proc.returncode == 0:
                return
            new_log = self._read_log(offset)
            last = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            # Make sure nothing is left running before retrying / giving up.
            self.pg_ctl("stop", "-m", "immediate", "-w", check=False)
            if not any(m in new_log.lower() for m in _PORT_IN_USE_MARKERS):
                break
        raise RuntimeError(
            f"failed to start PostgreSQL (port {self.port}):\n{last}{self._log_tail_section()}"
        )

    def stop(self) -> None:
        """Stop the server and remove its temporary directory.  Idempotent."""
        if not self._running:
            return
        self._running = False
        atexit.unregister(self.stop)
        try:
            if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                pid = self.pid
                try:
                    proc = self.pg_ctl("stop", "-m", "immediate", "-w", check=False)
                    ok = proc.returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                if not ok and pid is not None:
                    self._kill(pid)
        finally:
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)

    def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m MODE -w`` (same port and options)."""
        self._require_running()
        self.pg_ctl(
            "restart", "-m", mode, "-w", "-t", "60",
            "-l", self.logfile, "-o", self._server_options(),
        )  # fmt: skip

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``pg_ctl -D DATADIR *args`` (as the server user)."""
        if not self.datadir:
            raise RuntimeError("server has not been started")
        return self._run([self._bin("pg_ctl"), "-D", self.datadir, *args], check=check)

    # ------------------------------------------------------------------ clients

    def _require_running(self) -> None:
        if not self._running:
            raise RuntimeError("server is not running")

    def url(self, dbname: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/db``."""
        self._require_running()
        return f"{driver}://postgres@127.0.0.1:{self.port}/{dbname}"

    def psql(
        self, sql: str, dbname: str = "postgres", *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run *sql* with ``psql`` over TCP; output is unaligned, tuples only."""
        self._require_running()
        return self._run(
            [
                self._bin("psql"),
                "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1",
                "-p", str(self.port),
                "-U", "postgres",
                "-d", dbname,
                "-c", sql,
            ],
            check=check,
            server_user=False,
        )  # fmt: skip

    def createdb(self, name: str) -> None:
        """``CREATE DATABASE name``."""
        quoted = '"' + name.replace('"', '""') + '"'
        self.psql(f"CREATE DATABASE {quoted}")

    # ---------------------------------------------------------- context manager

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Explicit handlers: SIGINT may be ignored when started as a background job,
    # and the default SIGTERM action would skip cleanup.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with PgServer() as _pg:
        print(_pg.url(), flush=True)
        print(f"datadir: {_pg.datadir}  log: {_pg.logfile}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
