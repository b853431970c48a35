"""Start and stop a throwaway MariaDB server for the test-suite.

Stdlib only (the tests talk to it through PyMySQL). Usage::

    with MariaDBServer() as server:
        server.createdb("alchq_test")
        engine = create_engine(server.url("alchq_test"))

The binaries (``mariadb-install-db``, ``mariadbd``) come from the distribution's
``mariadb-server`` package (``.ci/run`` installs it). The server runs from a
fresh temporary folder on a free port, as the ``mysql`` user when started by
root, never as the machine's own service. Run ``python tests/mariadbserver.py``
to start one for manual debugging.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any

__all__ = ["MariaDBServer"]

_START_TIMEOUT = 60.0
_USER = "alchq"
_PASSWORD = "alchq-test"  # noqa: S105 - a throwaway server on loopback


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(name: str) -> str:
    for folder in (os.environ.get("ALCHQ_MARIADB_BINDIR"), "/usr/sbin", "/usr/bin"):
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"MariaDB's {name} was not found: install the distribution's mariadb-server "
            "package (or set ALCHQ_MARIADB_BINDIR)"
        )
    return found


class MariaDBServer:
    """A throwaway MariaDB server living in a fresh temporary directory."""

    def __init__(self, *, durable: bool = False) -> None:
        #: Durable: every commit flushed to disk, as a production server (benchmarks).
        self.durable = durable
        self.install_db = _binary("mariadb-install-db")
        self.mariadbd = _binary("mariadbd")
        self.port = 0
        self.tmpdir = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_as = "mysql" if os.geteuid() == 0 else None
        self._log: Any = None

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if self._run_as is None:
            return argv
        return ["runuser", "-u", self._run_as, "--", *argv]

    @property
    def socket_path(self) -> str:
        return os.path.join(self.tmpdir, "mysqld.sock")

    def start(self) -> MariaDBServer:
        self.tmpdir = tempfile.mkdtemp(prefix="alchq-mariadb-")
        data = os.path.join(self.tmpdir, "data")
        os.mkdir(data)
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            for path in (self.tmpdir, data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        install = subprocess.run(
            self._as_server_user(
                [
                    self.install_db,
                    "--no-defaults",
                    f"--datadir={data}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    *([f"--user={self._run_as}"] if self._run_as else []),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {install.stderr[-2000:]}")
        self.port = _free_port()
        self._launch()
        atexit.register(self.stop)
        self._wait_ready(
            f"CREATE USER IF NOT EXISTS '{_USER}'@'%' IDENTIFIED BY '{_PASSWORD}'",
            f"GRANT ALL PRIVILEGES ON *.* TO '{_USER}'@'%' WITH GRANT OPTION",
        )
        return self

    def _launch(self) -> None:
        data = os.path.join(self.tmpdir, "data")
        self._log = log = open(os.path.join(self.tmpdir, "server.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self._as_server_user(
                [
                    self.mariadbd,
                    "--no-defaults",
                    f"--datadir={data}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.socket_path}",
                    f"--pid-file={os.path.join(self.tmpdir, 'mysqld.pid')}",
                    "--skip-log-bin",
                    # Benchmarks: room for a table of millions of finished rows, as a
                    # production server would have.
                    f"--innodb-buffer-pool-size={'1G' if self.durable else '128M'}",
                    *(
                        ()
                        if self.durable
                        # A test server: durable enough for a test, not for data.
                        else ("--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0")
                    ),
                    "--max-connections=500",
                    # A test that waits on a lock fails in seconds, not InnoDB's 50.
                    "--innodb-lock-wait-timeout=5",
                    "--character-set-server=utf8mb4",
                    "--collation-server=utf8mb4_unicode_ci",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, *statements: str) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if not os.path.exists(self.socket_path) and self.proc.poll() is None:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("MariaDB did not start: no socket")
                time.sleep(0.1)
                continue
            try:
                self._admin(*statements or ("SELECT 1",))
                return
            except Exception as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"MariaDB did not start: {exc}") from exc
                time.sleep(0.2)

    def restart(self, how: str = "shutdown", down_for: float = 0.0) -> None:
        """Stop the server and start it again on the same data and port.

        ``how``: ``"shutdown"`` (``mariadb-admin shutdown``: clients are
        disconnected, transactions rolled back) or ``"kill"`` (SIGKILL: crash
        recovery at the next start). It stays down for ``down_for`` seconds.
        """
        proc = self.proc
        assert proc is not None, "not running"
        if how == "kill":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            subprocess.run(
                [_binary("mariadb-admin"), f"--socket={self.socket_path}", "-uroot", "shutdown"],
                capture_output=True,
                timeout=60,
                check=True,
            )
        proc.wait(timeout=60)
        if self._log is not None:
            self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        time.sleep(down_for)
        self._launch()
        self._wait_ready()

    def _admin(self, *statements: str) -> None:
        import pymysql  # type: ignore[import-untyped]

        conn = pymysql.connect(unix_socket=self.socket_path, user="root", autocommit=True)
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()

    def createdb(self, name: str) -> None:
        self._admin(f"CREATE DATABASE `{name}`")

    def url(self, database: str) -> str:
        return f"mysql+pymysql://{_USER}:{_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""

    def __enter__(self) -> MariaDBServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    with MariaDBServer() as server:
        server.createdb("alchq")
        print(server.url("alchq"), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
