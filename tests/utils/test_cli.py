"""openmoe/utils/cli.py: one line per failure (exit 2, --debug for the traceback), SIGTERM
cleanup, stale temporaries, the out_dir lock; train.py's OS errors through it."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from openmoe.utils.cli import DirLock, Interrupted, atomic_path, cli_errors, remove_stale_temps

ROOT = Path(__file__).resolve().parents[2]


def _run(body, capsys, debug=False):
    with cli_errors("prog", debug=debug) as status:
        body()
    return status.code, capsys.readouterr().err


def _raise(e):
    def body():
        raise e
    return body


def test_errors_are_one_line_exit_2_and_debug_shows_the_traceback(capsys):
    code, err = _run(_raise(OSError(errno.ENOSPC, "No space left on device", "/out/x.distcp")), capsys)
    assert code == 2 and err == "prog: error: /out/x.distcp: disk full (ENOSPC)\n"
    code, err = _run(_raise(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64\nmore")),
                     capsys)
    assert code == 2 and "write failed (disk full?)" in err and len(err.splitlines()) == 1
    code, err = _run(_raise(ValueError("--top-p 2.0: must be in (0, 1]")), capsys)
    assert (code, err) == (2, "prog: error: --top-p 2.0: must be in (0, 1]\n")
    code, err = _run(_raise(ZeroDivisionError("division by zero")), capsys)
    assert code == 1 and "internal error: ZeroDivisionError" in err and "Traceback" not in err
    code, err = _run(_raise(ValueError("bad")), capsys, debug=True)
    assert code == 2 and "Traceback" in err and err.endswith("prog: error: bad\n")


def test_sigterm_removes_the_temporary_output(tmp_path, capsys):
    from openmoe.checkpoint.shards import output_folder

    seen, before = {}, signal.getsignal(signal.SIGTERM)

    def body():
        with output_folder(tmp_path / "out", fsync=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            seen["tmp"] = tmp
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Interrupted here

    code, err = _run(body, capsys)
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err
    assert not seen["tmp"].exists() and not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live = tmp_path / f".out.tmp-{dead}", tmp_path / f".out.tmp-{os.getppid()}"
    stale.mkdir()
    live.mkdir()
    assert remove_stale_temps(tmp_path / "out") == [stale]
    assert not stale.exists() and live.exists()
    with pytest.raises(Interrupted):
        with atomic_path(tmp_path / "f.jsonl") as t:
            t.write_text("half")
            raise Interrupted(signal.SIGTERM)
    assert os.listdir(tmp_path) == [live.name]


def test_locked_or_unwritable_out_dir_is_one_line(run_setup, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    sys.path.insert(0, str(ROOT))
    from openmoe.cli import train

    out = Path(run_setup[run_setup.index("--out_dir") + 1])
    with DirLock(out):  # another run holds it
        assert train.main(run_setup + ["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()
    blocker = out.parent / "afile"
    blocker.write_text("x")  # out_dir under a file: mkdir fails (as a read-only or missing parent does)
    assert train.main(run_setup + ["--steps", "1", "--out_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and str(blocker) in err and len(err.strip().splitlines()) == 1


_SLOW_CONVERT = """
import runpy, sys, time
import openmoe.checkpoint.shards as shards
tensor = shards.ShardWriter.tensor  # every tensor of a shard goes through it
def slow(self, *a, **k):
    print("writing", flush=True)
    time.sleep(0.5)
    return tensor(self, *a, **k)
shards.ShardWriter.tensor = slow
sys.argv = ["convert_jax_checkpoint.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_of_a_conversion_leaves_no_temporary_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))
    from helpers import tiny_config
    from t5x_fixture import random_params, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "c", random_params(tiny_config(), seed=1))
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(ckpt), str(tmp_path / "out"), "--head-dim", "16",
                          "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while "writing" not in p.stdout.readline():  # the temporary folder exists and has shards in it
        assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert err.strip().splitlines() == ["convert_jax_checkpoint.py: interrupted by SIGTERM; temporary outputs removed"]
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no .out.tmp-PID, no out
