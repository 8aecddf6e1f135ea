"""The logs of `arf up` stay bounded, with small real processes under the real Supervisor: a
component that writes numbered lines as fast as it can (a crash loop's tracebacks, a scheduler
that logs every loop), and a supervisor whose own log fills in a few restarts. Every line
written is found again, once and in order, across the generations kept."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_stack_review import _kill_all
from test_supervisor import _python, _wait

from arf_training import stack
from arf_training.errors import ArfError
from arf_training.logrotate import LogLimits
from arf_training.procs import open_private_log
from arf_training.supervisor import Component, Supervisor

CAP = 64 * 1024  # the smallest cap ARF_LOG_MAX_BYTES allows: a few hundred lines fill it

# Writes lines `first` .. `first + count - 1` (100 bytes each, one write() each), then touches
# `done` and stays up. With `next` (a file holding where to start) and `total`, it continues
# the count of its previous process and exits after `count` lines, until `total` are written.
WRITER = textwrap.dedent("""
    import os, pathlib, sys, time
    first, count, done = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
    nxt = pathlib.Path(sys.argv[4]) if len(sys.argv) > 4 else None
    if nxt:
        first = int(nxt.read_text()) if nxt.exists() else first
        if first >= int(sys.argv[5]):
            done.touch()
            time.sleep(600)
    for i in range(first, first + count):
        os.write(1, b"%08d %s\\n" % (i, b"x" * 90))
    if nxt:
        nxt.write_text(str(first + count))
        sys.exit(1)
    done.touch()
    time.sleep(600)
""")


def _generations(log: Path) -> list[Path]:
    """`log` and its rotated generations, oldest first."""
    older = sorted((p for p in log.parent.glob(log.name + ".*") if p.suffix[1:].isdigit()),
                   key=lambda p: -int(p.suffix[1:]))
    return older + [log] if log.exists() else older


def _lines(log: Path) -> list[bytes]:
    while True:
        try:
            return [line for path in _generations(log) for line in path.read_bytes().splitlines()]
        except FileNotFoundError:  # rotated while being read: read them again
            pass


def _numbers(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in _lines(log) if line[:8].isdigit()]


def _modes(log: Path) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in _generations(log)}


def _writer(tmp_path: Path, first: int, count: int, *more: str) -> Component:
    return Component("scheduler", _python(WRITER, str(first), str(count),
                                          str(tmp_path / "done"), *more), dict(os.environ))


def test_a_component_log_stays_under_its_cap_and_loses_no_line_across_rotations(tmp_path):
    """The scheduler's log grew without bound. Bounded now, and every line is kept, in order
    (copy-then-truncate, the usual fix, loses what is written between the copy and the
    truncate), and an older version's 0644 log becomes a 0600 generation."""
    log = tmp_path / "scheduler.log"
    log.write_text("a line from an older version, whose logs were 0644\n")
    log.chmod(0o644)
    sup = Supervisor([_writer(tmp_path, 0, 2000)], tmp_path, log=lambda line: None,
                     log_limits=LogLimits(max_bytes=CAP, backups=3))
    try:
        sup._start(sup.slots[0])
        _wait("the writer", (tmp_path / "done").exists, tick=sup.tick)
        _wait("every line in the log", lambda: _numbers(log)[-1:] == [1999], timeout=10)
        assert _numbers(log) == list(range(2000))  # none lost, none twice, in order
        assert _lines(log)[0].startswith(b"a line from an older version")
        sizes = {p.name: p.stat().st_size for p in _generations(log)}
        assert len(sizes) == 4 and max(sizes.values()) <= CAP, sizes  # 200 KB: 3 rotations
        assert set(_modes(log).values()) == {"0o600"}, _modes(log)
        assert all(len(line) == 99 for line in _lines(log)[1:])  # whole lines, never split
    finally:
        sup.stop_all()


def test_generations_roll_across_restarts_and_only_the_newest_are_kept(tmp_path):
    """300 KB through a component that exits after each 100 KB: its processes write one log
    (the old pump may still drain while the new process starts), `ARF_LOG_BACKUPS` generations
    are kept, and one kept by an earlier, larger setting is removed."""
    log = tmp_path / "scheduler.log"
    (tmp_path / "scheduler.log.7").write_text("kept when ARF_LOG_BACKUPS was 7\n")
    writer = _writer(tmp_path, 0, 1000, str(tmp_path / "next"), "3000")
    sup = Supervisor([writer], tmp_path, log=lambda line: None, backoff_s=(0.05, 0.05),
                     log_limits=LogLimits(max_bytes=CAP, backups=2))
    try:
        sup._start(sup.slots[0])
        _wait("three processes' lines", (tmp_path / "done").exists, tick=sup.tick)
        _wait("the last line in the log", lambda: _numbers(log)[-1:] == [2999], timeout=10)
        assert sup.slots[0].restarts == 3
        assert [p.name for p in _generations(log)] == [
            "scheduler.log.2", "scheduler.log.1", "scheduler.log"]
        kept = _numbers(log)
        assert kept == list(range(kept[0], 3000)) and len(kept) > 2 * (CAP // 100) - 10
        assert max(p.stat().st_size for p in _generations(log)) <= CAP
        assert set(_modes(log).values()) == {"0o600"}
    finally:
        sup.stop_all()


# Two bursts of numbered lines, each when its `go<n>` file appears; `done<n>` after each.
BURSTS = textwrap.dedent("""
    import os, pathlib, sys, time
    here, first = pathlib.Path(sys.argv[1]), 0
    for burst, count in enumerate((30000, 2000)):
        while not (here / f"go{burst}").exists():
            time.sleep(0.05)
        for i in range(first, first + count):
            os.write(1, b"%08d %s\\n" % (i, b"x" * 90))
        first += count
        (here / f"done{burst}").touch()
    time.sleep(600)
""")


def test_a_component_is_never_held_up_by_its_log_nor_writes_into_a_deleted_one(tmp_path):
    """3 MB at once (three times the pipe) while the supervisor's loop does not run (it
    waits on a slow readiness probe, or a 15 s stop): the component finishes at its own
    speed. Then someone deletes the log (`rm run/*.log`): what follows is in a new one, not
    in the deleted file that nobody can read and whose space only a restart would free."""
    log = tmp_path / "scheduler.log"
    sup = Supervisor([Component("scheduler", _python(BURSTS, str(tmp_path)), dict(os.environ))],
                     tmp_path, log=lambda line: None,
                     log_limits=LogLimits(max_bytes=CAP, backups=3))
    try:
        sup._start(sup.slots[0])
        (tmp_path / "go0").touch()
        _wait("3 MB written, with no tick of the supervisor", (tmp_path / "done0").exists,
              timeout=15)
        _wait("the last line in the log", lambda: _numbers(log)[-1:] == [29999], timeout=10)
        kept = _numbers(log)
        assert kept == list(range(kept[0], 30000)) and len(_generations(log)) == 4
        log.unlink()
        (tmp_path / "go1").touch()
        _wait("the second burst", lambda: _numbers(log)[-1:] == [31999], timeout=10)
        kept = _numbers(log)
        assert kept == list(range(kept[0], 32000)) and kept[0] <= 30000, kept[:3]
        assert max(p.stat().st_size for p in _generations(log)) <= CAP
        assert set(_modes(log).values()) == {"0o600"}
    finally:
        sup.stop_all()


# A supervisor whose own log fills fast: a component that exits at once, with a 45 KB command
# line (each "started" line is one), and a step before each start that prints to the
# supervisor's stderr the way the database migration's subprocess does.
DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from arf_training.logrotate import LogLimits
    from arf_training.supervisor import Component, Supervisor
    starts = [0]
    def migrate():
        starts[0] += 1
        print(f"migration output {starts[0]}", file=sys.stderr, flush=True)
    flaky = Component("flaky", ["sh", "-c", "exit 3", "x" * 45000], dict(os.environ),
                      before_start=migrate)
    sys.exit(Supervisor([flaky], Path(sys.argv[1]), backoff_s=(0.01, 0.01), grace_s=3,
                        log_limits=LogLimits(max_bytes=int(sys.argv[2]), backups=2)).run())
""")


def test_the_supervisor_log_rotates_and_its_stdout_and_stderr_follow(tmp_path):
    """supervisor.log, which `arf up` makes the supervisor's stdout and stderr: it rotates like
    a component's, and what is printed to those (a traceback, a child's output) lands in the
    newest file, in order, not in a generation about to be deleted."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / "supervisor.log"
    with open_private_log(log) as out:  # as `arf up` starts it
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(run), str(CAP)], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True)
    try:
        _wait("four starts", lambda: any(b"; restart #4 in" in line for line in _lines(log)),
              timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = _lines(log)
        assert [p.name for p in _generations(log)] == [
            "supervisor.log.2", "supervisor.log.1", "supervisor.log"]
        # Each start's migration output, then its "started" line: in order across files.
        strays = [i for i, line in enumerate(lines) if line.startswith(b"migration output")]
        numbers = [int(lines[i].split()[-1]) for i in strays]
        assert numbers, "nothing printed to the supervisor's stderr is in the logs kept"
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
        assert numbers[-1] >= 4
        assert all(b"arf-supervisor: started flaky" in lines[i + 1] for i in strays), [
            line[:60] for line in lines]
        # Its own lines are counted exactly; a print to stderr right after one may add a line.
        assert max(p.stat().st_size for p in _generations(log)) <= CAP + 100
        assert set(_modes(log).values()) == {"0o600"}
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(proc.pid)


@pytest.mark.parametrize("variable, value, why", [
    pytest.param("ARF_LOG_MAX_BYTES", "lots", "is not a size", id="size-not-a-number"),
    pytest.param("ARF_LOG_MAX_BYTES", "50MB", "is not a size", id="size-ambiguous-unit"),
    pytest.param("ARF_LOG_MAX_BYTES", "-5", "is not a size", id="size-negative"),
    pytest.param("ARF_LOG_MAX_BYTES", "50", "is 50 bytes, below the minimum", id="size-tiny"),
    pytest.param("ARF_LOG_MAX_BYTES", "0", "is 0 bytes, below the minimum", id="size-zero"),
    pytest.param("ARF_LOG_BACKUPS", "0", "is not a number of rotated logs", id="backups-zero"),
    pytest.param("ARF_LOG_BACKUPS", "three", "is not a number of rotated", id="backups-word"),
    pytest.param("ARF_LOG_BACKUPS", "1000000", "is not a number of", id="backups-huge"),
    pytest.param("ARF_LOG_RETENTION_DAYS", "-1", "is not a number of days", id="days-negative"),
    pytest.param("ARF_LOG_RETENTION_DAYS", "2w", "is not a number of days", id="days-word"),
    pytest.param("ARF_LOG_RETENTION_DAYS", "36501", "is not a number of", id="days-huge"),
])
def test_a_bad_log_setting_is_one_clear_error_before_anything_starts(tmp_path, monkeypatch,
                                                                      variable, value, why):
    with pytest.raises(ArfError, match=rf"^{variable}='{value}' {why}.*(give|unset)"):
        LogLimits.from_env({variable: value})
    home = tmp_path / "home"
    monkeypatch.setenv("ARF_HOME", str(home))
    monkeypatch.setenv("ARF_DB", "sqlite")
    monkeypatch.setenv(variable, value)
    # Should the setting go unchecked, `up` stops at this taken port, before starting anything.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ArfError, match=variable):
            stack.up(stack.StackOptions(api_port=taken.getsockname()[1]), timeout_s=5)
    assert not (home / "run").exists(), "it went on to prepare a stack with the bad setting"


@pytest.mark.parametrize("env, limits", [
    pytest.param({}, (50 * 1024 ** 2, 3, 15), id="defaults"),
    pytest.param({"ARF_LOG_MAX_BYTES": "", "ARF_LOG_BACKUPS": " ", "ARF_LOG_RETENTION_DAYS": ""},
                 (50 * 1024 ** 2, 3, 15), id="empty-is-default"),
    pytest.param({"ARF_LOG_MAX_BYTES": "200MiB", "ARF_LOG_BACKUPS": "10"},
                 (200 * 1024 ** 2, 10, 15), id="mib"),
    pytest.param({"ARF_LOG_MAX_BYTES": "1g"}, (1024 ** 3, 3, 15), id="short-unit"),
    pytest.param({"ARF_LOG_MAX_BYTES": "65536"}, (65536, 3, 15), id="bytes"),
    pytest.param({"ARF_LOG_RETENTION_DAYS": "0"}, (50 * 1024 ** 2, 3, 0), id="keep-forever"),
    pytest.param({"ARF_LOG_RETENTION_DAYS": " 30 "}, (50 * 1024 ** 2, 3, 30), id="days"),
])
def test_log_settings_that_are_read(env, limits):
    got = LogLimits.from_env(env)
    assert (got.max_bytes, got.backups, got.retention_days) == limits
