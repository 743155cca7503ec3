"""Import HF transformers' own test mixins (the `tests/` folder of the pinned sdist) as the package
`hf_tests`, from the folder named by env OPENMOE_HF_TESTS (default `.cache/transformers-tests/tests`
in the repository root; `make test-hf` fills it).

The sdist's `tests/` holds the common mixins (test_modeling_common, test_configuration_common,
test_fsdp_mixin, test_training_mixin, ...) but not the modules they import from sub-folders of
HF's git tree: generation/test_utils.py, exporters/test_export.py, utils/test_configuration_utils.py,
distributed_testing_utils.py. Where such a file is absent, a stand-in is registered instead
(MISSING lists which), so the mixins import; no stand-in adds tests of its own:
  generation.test_utils.GenerationTesterMixin  empty: HF's generate tests are not run
  exporters.test_export.ExportTesterMixin      empty: HF's torch.export tests are not run
  utils.test_configuration_utils               config_common_kwargs = {} (that one config check is vacuous)
  distributed_testing_utils                    the five process/device helpers test_fsdp_mixin uses
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HF_TESTS = Path(os.environ.get("OPENMOE_HF_TESTS", REPO / ".cache" / "transformers-tests" / "tests"))
PKG = "hf_tests"
MISSING: list[str] = []


def available() -> bool:
    return (HF_TESTS / "test_modeling_common.py").is_file()


def _package(name: str, path: Path) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__package__ = name
    sys.modules[name] = mod
    return mod


def _stand_in(dotted: str, build) -> None:
    """Register `hf_tests.<dotted>` built by `build(module)` unless HF's file exists."""
    parts = dotted.split(".")
    if HF_TESTS.joinpath(*parts[:-1], parts[-1] + ".py").is_file():
        return
    for i in range(1, len(parts)):
        _package(".".join([PKG, *parts[:i]]), HF_TESTS.joinpath(*parts[:i]))
    mod = types.ModuleType(f"{PKG}.{dotted}")
    build(mod)
    sys.modules[mod.__name__] = mod
    MISSING.append(dotted)


def _generation(mod):
    class GenerationTesterMixin:
        """Stand-in: tests/generation/test_utils.py is not in the transformers sdist."""

    mod.GenerationTesterMixin = GenerationTesterMixin


def _export(mod):
    class ExportTesterMixin:
        """Stand-in: tests/exporters/test_export.py is not in the transformers sdist."""

    mod.ExportTesterMixin = ExportTesterMixin


def _config_utils(mod):
    mod.config_common_kwargs = {}


def _distributed(mod):
    import torch
    import torch.multiprocessing as mp

    def _get_distributed_device_type() -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _get_distributed_backend() -> str:
        return "nccl" if _get_distributed_device_type() == "cuda" else "gloo"

    def _get_rank_device(rank: int) -> torch.device:
        kind = _get_distributed_device_type()
        return torch.device(kind, rank) if kind != "cpu" else torch.device("cpu")

    def _set_rank_device(rank: int) -> None:
        if _get_distributed_device_type() == "cuda":
            torch.cuda.set_device(rank)

    def _start_rank_processes(fn, args=(), nprocs=1):
        # The rank processes start fresh (spawn): `hf_tests` must be registered there before the
        # test's functions (pickled by their `hf_tests.*` names) are unpickled, so they travel
        # as bytes through a top-level function of this module.
        mp.spawn(_rank_main, args=(pickle.dumps((fn, args)),), nprocs=nprocs, join=True)

    for f in (_get_distributed_device_type, _get_distributed_backend, _get_rank_device, _set_rank_device,
              _start_rank_processes):
        setattr(mod, f.__name__, f)


def _rank_main(rank: int, payload: bytes) -> None:
    load()
    fn, args = pickle.loads(payload)
    fn(rank, *args)


def load() -> types.ModuleType:
    """The `hf_tests` package, stand-ins registered; import its modules as `hf_tests.<name>`."""
    pkg = _package(PKG, HF_TESTS)
    _stand_in("generation.test_utils", _generation)
    _stand_in("exporters.test_export", _export)
    _stand_in("utils.test_configuration_utils", _config_utils)
    _stand_in("distributed_testing_utils", _distributed)
    return pkg
