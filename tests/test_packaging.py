"""The package as users install it: a wheel whose console commands run (--help) from a folder
that is not the checkout, and whose dependencies are ranges (exact pins live in requirements.txt)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["openmoe-train", "openmoe-infer", "openmoe-convert", "openmoe-serve", "openmoe-pretokenize",
            "openmoe-plot"]


def test_wheel_installs_console_commands_that_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("openmoe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "openmoe/cli/train.py" in names and not any(n.startswith("tests/") for n in names)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    for cmd in COMMANDS:
        script = tmp_path / "site" / "bin" / cmd
        assert script.is_file(), cmd
        # run it with this interpreter, from a folder that is not the checkout
        r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (cmd, r.stdout[-500:], r.stderr[-1500:])
        assert str(tmp_path / "site") in subprocess.run(
            [sys.executable, "-c", "import openmoe; print(openmoe.__file__)"], capture_output=True, text=True,
            cwd=tmp_path, env=env).stdout


def test_dependencies_are_ranges_and_requirements_pin_them():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if "==" in d], deps  # pins clash with every other environment
    pins = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "torch==2.13.0" in pins and "transformers==5.24.0" in pins  # the reproducible venv
