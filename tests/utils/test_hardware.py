"""openmoe/utils/hardware.py: the machine description and the CPU allocator setting."""

import subprocess
import sys
import textwrap

import pytest
import torch

from openmoe.utils.hardware import cpu_info, default_dtype

# Allocate, touch and free a 64 MiB buffer twelve times; the minor page faults of each round. Run in
# a fresh interpreter: the allocator setting is process-wide.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from openmoe.utils.hardware import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "1" else False
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 1024 * 1024, dtype=torch.float32)
        t.fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults)
""")


def _faults_per_round(retain: bool):
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", [int(x) for x in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
    # 64 MiB = 16384 pages of 4 KiB. glibc's default unmaps the buffer on free, so every round
    # faults all of it in again. Retained, rounds that reuse the heap fault nothing; how many early
    # rounds still grow or move it varies from machine to machine (CI once saw six of twelve), so
    # the test counts the free rounds instead of asking for a fixed settling point.
    applied, faults = _faults_per_round(retain=True)
    assert applied
    _, faults_default = _faults_per_round(retain=False)
    assert min(faults_default[1:]) > 8000, faults_default  # the cost the setting removes
    assert sum(f < 1000 for f in faults[1:]) >= 2, faults  # the default has none of these


def test_default_dtype_follows_the_cpu():
    expect = torch.bfloat16 if cpu_info()["native_bf16"] else torch.float32
    assert default_dtype("cpu") == expect
    assert default_dtype("cuda") == torch.bfloat16
