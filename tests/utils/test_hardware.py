"""openmoe/utils/hardware.py: the machine description and the CPU allocator setting."""

import subprocess
import sys
import textwrap

import pytest
import torch

from openmoe.utils.hardware import cpu_info, default_dtype

# Allocate, touch and free a 64 MiB buffer three times; count the minor page faults of the third
# round (the steady state of a training loop). Run in a fresh interpreter: the allocator setting is process-wide.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from openmoe.utils.hardware import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "1" else False
    def touch():
        t = torch.empty(16 * 1024 * 1024, dtype=torch.float32)
        t.fill_(1.0)
        del t
    touch()
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _second_round_faults(retain: bool):
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
    # 64 MiB = 16384 pages of 4 KiB: glibc's default mmap-and-unmap faults most of them in again
    applied, faults = _second_round_faults(retain=True)
    assert applied
    _, faults_default = _second_round_faults(retain=False)
    assert faults_default > 8000, faults_default  # the cost the setting removes (hugepages would lower it)
    assert faults < 1000, faults


def test_default_dtype_follows_the_cpu():
    expect = torch.bfloat16 if cpu_info()["native_bf16"] else torch.float32
    assert default_dtype("cpu") == expect
    assert default_dtype("cuda") == torch.bfloat16
