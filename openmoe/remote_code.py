"""Write the modeling code beside saved weights, so a folder loads with trust_remote_code=True
in an interpreter that never imported openmoe (the hub convention, via `auto_map`).

Two bundles: "openmoe" (OpenMoE folders) and "upcycled" (sparse-upcycled HF models, see
modeling_upcycled.py), each only the modules its folder imports.

HF's dynamic-module loader only follows same-level relative imports (`from .x import y`), so the
`moe/` subpackage is flattened into `moe_<name>.py` files and the imports are rewritten. The
rewrite is checked by a test that loads a saved folder in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

AUTO_MAP = {
    "AutoConfig": "configuration_openmoe.OpenMoeConfig",
    "AutoModel": "modeling_openmoe.OpenMoeModel",
    "AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM",
}
# Sparse-upcycled HF models (moe/upcycle.py): a wrapper config / loader that rebuilds the base
# transformers architecture and re-applies the saved upcycle spec.
UPCYCLED_AUTO_MAP = {
    "AutoConfig": "modeling_upcycled.UpcycledConfig",
    "AutoModelForCausalLM": "modeling_upcycled.UpcycledForCausalLM",
}

_HERE = Path(__file__).resolve().parent
# bundle -> (top-level modules, moe/ modules): exactly what each kind of folder imports (a folder
# loaded with trust_remote_code holds only those, and saves them again)
_MOE = ("kernels", "router", "expert_types", "noise", "dispatch", "layer")
_BUNDLES = {
    "openmoe": (("configuration_openmoe", "modeling_openmoe", "losses", "remote_code"), _MOE),
    "upcycled": (("modeling_upcycled", "remote_code"), _MOE + ("upcycle",)),
}


def _flatten(text: str, in_moe: bool) -> str:
    if in_moe:
        # same-package imports first: the `..x` -> `.x` rewrite below must not be prefixed again
        text = re.sub(r"^(\s*)from \.(\w+) import", r"\1from .moe_\2 import", text, flags=re.M)
        text = re.sub(r"^(\s*)from \.\.(\w+) import", r"\1from .\2 import", text, flags=re.M)
    else:
        text = re.sub(r"^(\s*)from \.moe\.(\w+) import", r"\1from .moe_\2 import", text, flags=re.M)
    return text


def bundle_files(bundle: str = "openmoe") -> dict[str, str]:
    """File name -> source for the flattened bundle, from the package or from a bundle."""
    top, moe = _BUNDLES[bundle]
    files = {}
    if (_HERE / "moe").is_dir():  # running from the openmoe package
        for name in top:
            files[f"{name}.py"] = _flatten((_HERE / f"{name}.py").read_text(), in_moe=False)
        for name in moe:
            files[f"moe_{name}.py"] = _flatten((_HERE / "moe" / f"{name}.py").read_text(), in_moe=True)
    else:  # running from a bundle loaded with trust_remote_code: copy it as it is
        for name in list(top) + [f"moe_{m}" for m in moe]:
            files[f"{name}.py"] = (_HERE / f"{name}.py").read_text()
    return files


def write_remote_code(save_directory: str | os.PathLike, bundle: str = "openmoe") -> None:
    save_directory = Path(save_directory)
    for name, text in bundle_files(bundle).items():
        # temp + rename: never leave a half-written module next to the weights
        fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        shutil.move(tmp, save_directory / name)
