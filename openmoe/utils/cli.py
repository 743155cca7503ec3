"""What every CLI (train.py, infer.py, convert_jax_checkpoint.py, train.py --plan) does with a
failure: one line on stderr that names the file, key or flag, exit status 2, no traceback
(`--debug` shows it). Also the pieces that keep a failure from leaving a complete-looking
output behind: SIGTERM/SIGINT turned into an exception (so `finally` cleanup runs), atomic
writes through a temporary sibling, removal of stale temporaries, and a lock on an output
folder.

    def main(argv=None):
        with cli_errors("train.py", debug="--debug" in (argv or sys.argv)) as status:
            ...
        return status.code
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

EXIT_BAD_INPUT = 2


class Interrupted(BaseException):
    """SIGTERM or SIGINT, raised in the main thread so that `finally` blocks (temporary folders,
    locks) run before the process exits. A BaseException, like KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):  # noqa: ARG001
    raise Interrupted(signum)


def install_signal_handlers() -> dict:
    """SIGTERM and SIGINT raise Interrupted (main thread only; elsewhere a no-op). Returns the
    previous handlers, for restore_signal_handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}


def restore_signal_handlers(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def describe_os_error(e: OSError) -> str:
    """'PATH: disk full (ENOSPC)' / 'PATH: Permission denied': the file first, then why."""
    name = e.filename if e.filename is not None else getattr(e, "path", None)
    if e.errno == errno.ENOSPC:
        why = "disk full (ENOSPC)"
    elif e.errno == errno.EDQUOT:
        why = "disk quota exceeded (EDQUOT)"
    else:
        why = e.strerror or str(e) or type(e).__name__
    if e.filename2 is not None:
        name = f"{name} -> {e.filename2}"
    return f"{name}: {why}" if name is not None else why


def _unwrap(e: BaseException) -> BaseException:
    """torch.distributed.checkpoint wraps a rank's failure in CheckpointException (a
    BaseException) whose `failures` map rank -> WrappedException(exc, traceback)."""
    failures = getattr(e, "failures", None)
    if type(e).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))  # WrappedException(exc, traceback): a named tuple
        inner = getattr(inner, "exc", inner)
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]
        return inner if isinstance(inner, BaseException) else e
    return e


def one_line(e: BaseException) -> str:
    """The message of an expected failure as one line."""
    e = _unwrap(e)
    if isinstance(e, OSError):
        return describe_os_error(e)
    text = str(e).strip()
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    if isinstance(e, RuntimeError) and ("inline_container" in text or "file write failed" in text):
        text = "write failed (disk full?): " + text.splitlines()[0]
    if getattr(e, "full_message", False):  # e.g. the memory plan's table after its first line
        return text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    return first if len(lines) <= 1 else f"{first} (+{len(lines) - 1} more lines; --debug shows all)"


class Status:
    code = 0


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool = False, expected: tuple = (), signals: bool = True) -> Iterator[Status]:
    """Run a CLI body: expected failures (ValueError and its subclasses, OSError, `expected`)
    become `prog: error: MESSAGE` and status.code 2; anything else one line too, naming its type,
    with status 1; SIGTERM/SIGINT status 128 + signal. With debug the traceback is printed too."""
    status = Status()
    old = install_signal_handlers() if signals else {}
    try:
        yield status
    except SystemExit:
        raise
    except Interrupted as e:
        print(f"{prog}: interrupted by {e}; temporary outputs removed", file=sys.stderr)
        status.code = 128 + e.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; temporary outputs removed", file=sys.stderr)
        status.code = 130
    except BaseException as e:  # noqa: BLE001  (CheckpointException is a BaseException)
        if debug:
            import traceback

            traceback.print_exc()
        inner = _unwrap(e)
        if isinstance(inner, (ValueError, OSError, *expected)) or "inline_container" in str(inner):
            print(f"{prog}: error: {one_line(inner)}", file=sys.stderr)
            status.code = EXIT_BAD_INPUT
        elif isinstance(inner, Exception):
            print(f"{prog}: internal error: {type(inner).__name__}: {one_line(inner)} (--debug shows the "
                  f"traceback)", file=sys.stderr)
            status.code = 1
        else:
            raise
    finally:
        restore_signal_handlers(old)


# ------------------------------------------------------------------ files


def tmp_sibling(path: str | os.PathLike) -> Path:
    """`DIR/.NAME.tmp-PID`: beside the target (same filesystem: the rename is atomic), hidden,
    and recognisable as stale by remove_stale_temps once PID is gone."""
    p = Path(path)
    return p.parent / f".{p.name}.tmp-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-PID` siblings of `path` left by processes that no longer run (a kill -9,
    a power cut); returns what was removed."""
    p = Path(path)
    removed = []
    if not p.parent.is_dir():
        return removed
    for cand in p.parent.glob(f".{p.name}.tmp-*"):
        pid = cand.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if cand.is_dir():
                shutil.rmtree(cand, ignore_errors=True)
            else:
                cand.unlink(missing_ok=True)
            removed.append(cand)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write (a file); renamed to `path` on success, removed on
    any error, interrupt included."""
    final = Path(path)
    tmp = tmp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object (a config): ValueError for bad JSON, bad UTF-8 or another
    JSON type, OSError for an unreadable file; callers name the file in their message."""
    import json

    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object")
    return d


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Before any work: the folder of `path` exists and a file can be created in it."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: folder {parent} does not exist")
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder")
    probe = tmp_sibling(p)
    try:
        probe.touch()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({describe_os_error(e)})") from None
    probe.unlink(missing_ok=True)


class DirLocked(ValueError):
    pass


class DirLock:
    """An exclusive flock on DIR/.lock: two runs cannot write the same folder. Released by
    release() and, whatever happens, when the process exits (the kernel drops it)."""

    def __init__(self, folder: str | os.PathLike, what: str = "out_dir"):
        self.folder, self.what, self._fd = Path(folder), what, None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirLock":
        import fcntl

        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise DirLocked(f"{self.what} {self.folder}: in use by another run (pid {holder}; lock {path}); "
                            f"wait for it or choose another {self.what}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # an object dropped without release() must not keep the folder locked
        self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
