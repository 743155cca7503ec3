"""The README's commands run as written.

Every shell command in README.md (```bash blocks, and `python ...` / `torchrun ...` / `lm_eval ...`
spans in the prose) is matched by exactly one rule below: either it runs here, on CPU, in a scratch
folder that holds the repository's scripts and configs, or it is skipped with the reason it cannot
run on this machine (a Hub download, a GPU, two machines, an elided `...`). A command added to the
README without a rule fails `test_every_readme_command_has_a_rule`, so nothing drifts untested.

Commands run in README order, so later ones use what earlier ones made (`out/try/final` from the
training commands). Where a command needs something the README leaves to the user, the rule says
what stands in: placeholders (`MODEL_DIR`, `CKPT_DIR`, `OUT_DIR`) are replaced by folders made
earlier, input files (`prompts.jsonl`, `heldout.jsonl`) are written first, and runs that take
minutes at the configured length get `--steps N` appended.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands(text: str) -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # line continuations
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # trailing comments
            if line and not line.startswith("#"):
                cmds.append(re.sub(r"\s+", " ", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    cmds += [m.group(1) for m in re.finditer(r"`((?:python|torchrun|lm_eval|accelerate) [^`]+)`", prose)]
    return cmds


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str                # re.search on the command
    skip: str = ""              # why it does not run here; empty: it runs
    replace: tuple = ()         # (placeholder, stand-in) pairs
    append: str = ""            # arguments added at the end
    tty: str | None = None      # typed at a terminal (interactive commands refuse a pipe)


ELIDED = "an elided command (`...`), shown for its flags"
RULES = [
    Rule(r"^make demo$", replace=(("make demo", "python -m openmoe.demo --out out/demo"),),
         append="--steps 20"),  # the demo's program; its corpus and tokenizer serve tiny_demo.yaml below
    Rule(r"^make (test|test-hf)$", skip="the CI runs it (.ci/run)"),
    Rule(r"^python train\.py --config configs/train/tiny_demo\.yaml --steps \d+ --out_dir out/try( --resume)?$"),
    Rule(r"pretrain_base\.yaml$", skip="streams SlimPajama and The Stack from the Hub"),
    Rule(r"finetune_8b_chat\.yaml$", skip="fine-tunes OpenMoE-8B from its folder (Hub, GPU)"),
    Rule(r"^torchrun --nproc_per_node 4 train\.py --config configs/train/tiny_demo\.yaml --ep 2 ",
         append="--steps 3"),  # 4 ranks on 2 cores: 400 steps take minutes
    Rule(r"^torchrun --nproc_per_node 4 train\.py --config \.\.\. ", skip=ELIDED),
    Rule(r"^torchrun --nnodes 2 ", skip="two machines"),
    Rule(r"^accelerate launch --multi_gpu", skip="8 GPUs (tests/parallel/test_accelerate_launch.py runs it on CPU)"),
    Rule(r"finetune_8b_chat\.yaml --init_from null --model configs/8b --tokenizer null --plan "),
    Rule(r"^python train\.py --init_from path/to/openmoe-8b ", skip="OpenMoE-8B's folder (Hub)"),
    Rule(r"^python train\.py \.\.\. --peft lora --quantize 4bit$", skip="CUDA and bitsandbytes"),
    Rule(r"path/to/openmoe-8b", skip="OpenMoE-8B's folder (Hub)"),
    Rule(r"^python infer\.py out/demo/train/final "),
    Rule(r"^python infer\.py MODEL_DIR --input prompts\.jsonl ", replace=(("MODEL_DIR", "out/try/final"),)),
    Rule(r"^python infer\.py MODEL_DIR --compile ", replace=(("MODEL_DIR", "out/try/final"),)),
    Rule(r"^python infer\.py MODEL_DIR --chat$", replace=(("MODEL_DIR", "out/try/final"),), tty="Hi!\n\n"),
    Rule(r"^python convert_jax_checkpoint\.py path/to/", skip="a released T5X checkpoint (GCS)"),
    Rule(r"^python convert_jax_checkpoint\.py CKPT_DIR OUT_DIR ",
         replace=(("CKPT_DIR", "t5x/checkpoint_1000"), ("OUT_DIR", "out/converted")),
         append="--head-dim 16"),  # the fixture is not a shipped size: shapes cannot give head_dim
    Rule(r"^(python train\.py|python -m openmoe\.data\.pretokenize|torchrun --nproc_per_node 2)$",
         skip="a program named in prose, not a command"),
    Rule(r"^python train\.py --init_from out/try/final --eval_data .* --eval_only$"),
    Rule(r"^lm_eval ", skip="lm-evaluation-harness is not in requirements-dev.txt (tests/test_lm_eval.py "
                            "runs this command on a local task where it is installed)"),
    Rule(r"^python -m openmoe\.plot OUT_DIR$", replace=(("OUT_DIR", "out/try"),)),
    Rule(r"^python -m openmoe\.serve ", skip="a server that runs until stopped (tests/test_serve.py serves over HTTP)"),
    Rule(r"^python bench/", skip="a benchmark (minutes; figures in docs/benchmarks.md)"),
]


def rule_for(cmd: str) -> Rule:
    hits = [r for r in RULES if re.search(r.pattern, cmd)]
    if not hits:
        raise LookupError(f"README command without a rule in tests/test_readme.py: {cmd!r}")
    return hits[0]


def test_every_readme_command_has_a_rule():
    cmds = readme_commands(README.read_text())
    assert len(cmds) > 20  # the parser found the blocks
    missing = []
    for c in cmds:
        try:
            rule_for(c)
        except LookupError as e:
            missing.append(str(e))
    assert not missing, "\n".join(missing)
    unused = [r.pattern for r in RULES if not any(re.search(r.pattern, c) for c in cmds)]
    assert not unused, f"rules that match no README command (stale): {unused}"


def _scratch(tmp: Path) -> dict:
    """A folder holding the repository's scripts and configs and the README's input files."""
    for name in ("train.py", "infer.py", "convert_jax_checkpoint.py", "configs"):
        (tmp / name).symlink_to(ROOT / name)
    # the venv's bin first: its `python` and `torchrun` (a symlink elsewhere would lose the venv)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # the user's input files the README assumes
    (tmp / "prompts.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": "def f"}\n')
    (tmp / "heldout.jsonl").write_text("".join(
        f'{{"text": "The river number {i} runs to the sea, and the sea is wide."}}\n' for i in range(40)))
    sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))
    from conftest import tiny_config
    from t5x_fixture import random_params, write_checkpoint

    write_checkpoint(tmp / "t5x" / "checkpoint_1000", random_params(tiny_config(), seed=1))
    return env


def _run(argv: list[str], cwd: Path, env: dict, tty: str | None) -> tuple[int, str]:
    if tty is None:
        p = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=600)
        return p.returncode, p.stdout + p.stderr
    import pty

    leader, follower = pty.openpty()  # a terminal for stdin; what is typed waits in its buffer
    try:
        os.write(leader, tty.encode())
        p = subprocess.run(argv, cwd=cwd, env=env, stdin=follower, capture_output=True, text=True, timeout=600)
    finally:
        os.close(leader)
        os.close(follower)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.timeout(1500)
def test_readme_commands_run(tmp_path):
    env = _scratch(tmp_path)
    failures, ran = [], []
    for cmd in readme_commands(README.read_text()):
        rule = rule_for(cmd)
        if rule.skip:
            continue
        line = cmd
        for old, new in rule.replace:
            line = line.replace(old, new)
        line = f"{line} {rule.append}".strip()
        rc, out = _run(shlex.split(line), tmp_path, env, rule.tty)
        ran.append(line)
        if rc != 0:
            failures.append(f"$ {line}\nexit {rc}\n{out[-1500:]}")
    assert len(ran) >= 12, ran
    assert not failures, "\n\n".join(failures)
    # what the commands promise, checked on what they wrote
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "out" / "converted" / "config.json").exists()
    assert list((tmp_path / "out" / "try" / "plots").glob("*.png"))
