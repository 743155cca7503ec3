"""openmoe/data/sources.py and mixture.py: proportions, determinism, resume, errors, chat masks."""

import gzip
import json

import pytest

from openmoe.data import DataError, PackedMixture, SourceConfig, chat_document, segments
from openmoe.generation import CHAT_TEMPLATE


def encode(text):  # a toy tokenizer: one id per character, >= 3
    return [3 + (ord(c) % 50) for c in text]


def _jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        path.write_text(data)
    return str(path)


@pytest.fixture
def two_sources(tmp_path):
    a = _jsonl(tmp_path / "rp.jsonl", [{"text": f"doc a{i}"} for i in range(50)])
    (tmp_path / "code").mkdir()
    for i in range(30):
        (tmp_path / "code" / f"m{i:02d}.py").write_text(f"x = {i}\n")
    return [SourceConfig(name="rp", path=a, weight=0.7),
            SourceConfig(name="stack", path=str(tmp_path / "code"), text_field="content", weight=0.3)]


def test_mixture_proportions_follow_weights(two_sources):
    m = PackedMixture(two_sources, encode, seq_len=16, batch_size=4, seed=0)
    for _ in range(60):
        m.next_batch()
    n = m.docs_per_source
    assert abs(n[0] / sum(n) - 0.7) < 0.06, n


def test_deterministic_and_resumable(two_sources):
    m1 = PackedMixture(two_sources, encode, 16, 3, seed=1)
    first = [m1.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(m1.state()))  # the state survives JSON (it goes in checkpoints)
    rest = [m1.next_batch() for _ in range(25)]  # crosses epochs of both sources
    m2 = PackedMixture(two_sources, encode, 16, 3, seed=1)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(first, [m2.next_batch() for _ in range(5)]))
    m3 = PackedMixture(two_sources, encode, 16, 3, seed=1)
    m3.load_state(state)
    for a in rest:
        b = m3.next_batch()
        assert all((a[k] == b[k]).all() for k in a)


def test_gz_and_parquet_sources(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    gz = _jsonl(tmp_path / "a.jsonl.gz", [{"text": "hello"}], gz=True)
    pq.write_table(pa.table({"content": ["def f(): pass"]}), tmp_path / "b.parquet")
    srcs = [SourceConfig(name="gz", path=gz), SourceConfig(name="pq", path=str(tmp_path / "b.parquet"),
                                                          text_field="content")]
    m = PackedMixture(srcs, encode, 8, 2, seed=0)
    m.next_batch()
    assert sum(m.docs_per_source) >= 2


def test_errors_name_the_source(tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="'e'.*empty"):
        PackedMixture([SourceConfig(name="e", path=empty)], encode, 8, 1).next_batch()
    nocol = _jsonl(tmp_path / "nocol.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match="missing column 'text'"):
        PackedMixture([SourceConfig(name="c", path=nocol)], encode, 8, 1).next_batch()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match="'b'.*bad.jsonl"):
        m = PackedMixture([SourceConfig(name="b", path=str(bad))], encode, 64, 1)
        for _ in range(3):
            m.next_batch()
    with pytest.raises(DataError, match="no such file"):
        PackedMixture([SourceConfig(name="m", path=str(tmp_path / "missing.jsonl"))], encode, 8, 1).next_batch()
    with pytest.raises(DataError, match="unknown keys"):
        SourceConfig.from_dict({"name": "x", "path": "y", "wieght": 2})
    with pytest.raises(DataError, match="weight"):
        SourceConfig.from_dict({"name": "x", "path": "y", "weight": 0})


def test_chat_loss_only_on_assistant_tokens():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    doc = chat_document({"messages": msgs}, encode)
    text = "".join(t for t, _ in segments(msgs))
    assert doc.ids == encode(text)
    trained = "".join(ch for ch, m in zip(text, doc.train_mask) if m)
    assert trained == " yo</s> a</s>"
    from jinja2 import Template

    assert Template(CHAT_TEMPLATE).render(messages=msgs) == text  # same string as the chat template
    doc2 = chat_document({"prompt": "p", "response": "r"}, encode)
    assert "".join(ch for ch, m in zip("<s>[INST] p [/INST] r</s>", doc2.train_mask) if m) == " r</s>"


def test_hub_source_offline_is_a_named_error(monkeypatch):
    # The real loading path (streaming from the hub) is kept; offline it fails with the source named.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = SourceConfig(name="redpajama", path="togethercomputer/RedPajama-Data-1T-Sample")
    with pytest.raises(DataError, match="'redpajama': cannot open togethercomputer/RedPajama-Data-1T-Sample"):
        PackedMixture([src], encode, 8, 1).next_batch()


def test_empty_and_non_text_sources_are_one_clear_error(tmp_path):
    from openmoe.data.sources import DocumentStream

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    for name, msg in (("empty", "has no examples"), ("num", "column 'text' is int, not text")):
        with pytest.raises(DataError, match=msg):
            DocumentStream(SourceConfig.from_dict({"name": name, "path": str(tmp_path / f"{name}.jsonl")})).next()
