"""openmoe/plot.py: the PNGs of a run, and the expert-load map computed by hand."""

import json

import pytest

from openmoe.plot import expert_load, main

PNG = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, rows):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_expert_load_is_the_count_over_the_mean_by_hand():
    rows = [{"step": 1, "tokens_per_expert": [[2, 6], [4, 4]]}, {"step": 2, "tokens_per_expert": [[0, 8], [1, 3]]}]
    steps, maps = expert_load(rows)
    assert steps == [1, 2]
    assert maps[0] == [[0.5, 0.0], [1.5, 2.0]]  # layer 0: expert 0 at steps 1, 2; expert 1
    assert maps[1] == [[1.0, 0.5], [1.0, 1.5]]


def test_plots_of_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "loss": 5.0 - s / 10, "lm_loss": 4.9 - s / 10, "lr": 1e-3 * s, "tokens_per_s": 100.0 + s,
             "mfu": 0.01, "drop_rate": [0.1, 0.2], "tokens_per_expert": [[3, 5, 8, 0], [4, 4, 4, 4]],
             **({"eval/web/loss": 5.5 - s / 10} if s % 2 == 0 else {})} for s in range(1, 7)]
    run = _run(tmp_path, rows)
    assert main([str(run)]) == 0
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert names == ["drop_rate.png", "expert_load.png", "loss.png", "lr.png", "speed.png"]
    assert all((run / "plots" / n).read_bytes()[:8] == PNG for n in names)


def test_bad_run_dir_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openmoe.plot: error:") and "metrics.jsonl" in err and "\n" not in err
    (tmp_path / "metrics.jsonl").write_text("{oops\n")
    assert main([str(tmp_path)]) == 2 and "line 1" in capsys.readouterr().err
