"""Pre-tokenized folders (openmoe/data/tokens.py, pretokenize.py) and hub-corpus errors/layouts
(sources.py): exact packing, resume, atomic writes, tokenizer identity, gated/script-only errors."""

import json
import os

import numpy as np
import pytest

from openmoe.data import DataError, PackedMixture, SourceConfig, TextTokenizer, train_sentencepiece
from openmoe.data.pretokenize import main as pretokenize_main
from openmoe.data.pretokenize import pretokenize
from openmoe.data.tokens import TokenStream, token_dtype


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [f"doc {i}: " + "hello world, spam and eggs " * (1 + i % 5) for i in range(240)]
    (d / "rp.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model = train_sentencepiece(texts, str(d / "spm"), 300)
    out = d / "rp_tok"
    pretokenize(SourceConfig(name="rp", path=str(d / "rp.jsonl")), model, str(out), num_proc=2, chunk=16,
                shard_tokens=3000, log=lambda *_: None)
    return d, model, str(out)


def _same(a, b):
    return all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_index_and_worker_count_independent(corpus):
    d, model, out = corpus
    index = json.loads(open(os.path.join(out, "index.json")).read())
    assert index["dtype"] == "uint16" and index["num_documents"] == 240 and len(index["shards"]) > 2
    assert index["tokenizer"]["sha256"] == TextTokenizer(model).fingerprint()
    assert token_dtype(65536) == np.uint16 and token_dtype(256384) == np.uint32  # umT5: uint32
    # one process (through the command) writes the same bytes as two workers
    assert pretokenize_main(["--source", str(d / "rp.jsonl"), "--tokenizer", model, "--out", str(d / "one"),
                             "--num-proc", "1", "--shard-tokens", "3000"]) == 0
    for f in sorted(os.listdir(out)):
        if f != "index.json":
            assert open(os.path.join(out, f), "rb").read() == open(d / "one" / f, "rb").read(), f
    tok = TextTokenizer(model)
    s = TokenStream(SourceConfig(name="t", path=out))
    assert s.document(37).tolist() == tok.encode(json.loads((d / "rp.jsonl").read_text().splitlines()[37])["text"])


def test_packs_like_text_and_resumes_exactly(corpus):
    d, model, out = corpus
    tok = TextTokenizer(model)
    text = [SourceConfig(name="rp", path=str(d / "rp.jsonl"), weight=0.6), SourceConfig(name="t2", path=out, weight=0.4)]
    toks = [SourceConfig(name="rp", path=out, weight=0.6), SourceConfig(name="t2", path=out, weight=0.4)]
    a = PackedMixture(text, tok.encode, 64, 8, seed=5)
    b = PackedMixture(toks, tok.encode, 64, 8, seed=5)
    for _ in range(10):
        assert _same(a.next_batch(), b.next_batch())  # the folder packs exactly as its text
    state = json.loads(json.dumps(b.state()))
    rest = [b.next_batch() for _ in range(100)]  # crosses epochs
    assert b.streams[0].epoch >= 1
    c = PackedMixture(toks, tok.encode, 64, 8, seed=5)
    c.load_state(state)
    for x in rest:
        assert _same(x, c.next_batch())


def test_atomic_write_and_errors(corpus, tmp_path):
    d, model, out = corpus
    with pytest.raises(FileExistsError):
        pretokenize(SourceConfig(name="rp", path=str(d / "rp.jsonl")), model, out, log=lambda *_: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="missing column 'text'"):
        pretokenize(SourceConfig(name="b", path=str(bad)), model, str(tmp_path / "o"), log=lambda *_: None)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # neither the folder nor its temporary copy is left
    other = train_sentencepiece([f"other words {i}" for i in range(50)], str(tmp_path / "o2"), 300)
    with pytest.raises(DataError, match="tokenized with.*re-run openmoe.data.pretokenize"):
        PackedMixture([SourceConfig(name="t", path=out)], TextTokenizer(other).encode, 16, 1)
    with pytest.raises(DataError, match="no index.json"):
        PackedMixture([SourceConfig(name="t", path=str(tmp_path), format="tokens")], None, 16, 1)


# ---- hub corpora: the exceptions `datasets` 4+ raises, mocked offline -------------------------

def _raise(exc):
    def load_dataset(*a, **k):
        raise exc
    return load_dataset


def test_script_only_dataset_says_what_to_use(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _raise(
        RuntimeError("Dataset scripts are no longer supported, but found RedPajama-Data-1T.py")))
    src = SourceConfig(name="redpajama", path="togethercomputer/RedPajama-Data-1T")
    with pytest.raises(DataError, match=r"'redpajama'.*script-based.*refs/convert/parquet.*SlimPajama-627B") as e:
        PackedMixture([src], str.split, 8, 1).next_batch()
    assert "\n" not in str(e.value)


def test_gated_dataset_says_how_to_get_access(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    # as datasets.load.dataset_module_factory raises it (from huggingface_hub's GatedRepoError)
    gated = DatasetNotFoundError("Dataset 'bigcode/the-stack-dedup' is a gated dataset on the Hub. "
                                 "You must be authenticated to access it.")
    monkeypatch.setattr(datasets, "load_dataset", _raise(gated))
    src = SourceConfig(name="the-stack", path="bigcode/the-stack-dedup", data_dir="data/python", text_field="content")
    pat = r"'the-stack'.*gated.*huggingface.co/datasets/bigcode/the-stack-dedup.*HF_TOKEN.*huggingface-cli login"
    with pytest.raises(DataError, match=pat):
        PackedMixture([src], str.split, 8, 1).next_batch()

    class Stream:  # opened, but a shard is refused while streaming (403: terms not accepted)
        def __iter__(self):
            raise FileNotFoundError("403 Client Error. Cannot access gated repo for url https://huggingface.co/...")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Stream())
    with pytest.raises(DataError, match=pat):
        PackedMixture([src], str.split, 8, 1).next_batch()


def test_pretokenize_command_reports_hub_errors_in_one_line(monkeypatch, corpus, tmp_path, capsys):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _raise(
        RuntimeError("Dataset scripts are no longer supported, but found RedPajama-Data-1T.py")))
    rc = pretokenize_main(["--source", "togethercomputer/RedPajama-Data-1T", "--tokenizer", corpus[1],
                           "--out", str(tmp_path / "rp"), "--num-proc", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "SlimPajama-627B" in err
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_zst_without_zstandard_says_what_to_install(tmp_path):
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard is installed")
    except ImportError:
        pass
    f = tmp_path / "example_train_0.jsonl.zst"  # SlimPajama's file naming
    f.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="pip install zstandard"):
        PackedMixture([SourceConfig(name="slim", path=str(f))], str.split, 8, 1).next_batch()


def test_local_copies_laid_out_like_the_hub(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    # bigcode/the-stack-dedup: data/<lang>/data-0000N-of-0000M.parquet, column `content`
    stack = tmp_path / "the-stack-dedup"
    for lang in ("python", "c"):
        (stack / "data" / lang).mkdir(parents=True)
        for i in range(2):
            pq.write_table(pa.table({"content": [f"{lang} file {i}.{j}" for j in range(3)], "lang": [lang] * 3}),
                           stack / "data" / lang / f"data-0000{i}-of-00002.parquet")
    # RedPajama-Data-1T, branch refs/convert/parquet: <subset>/partial-train/NNNN.parquet, column `text`
    rp = tmp_path / "RedPajama-Data-1T"
    (rp / "wikipedia" / "partial-train").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["wiki a", "wiki b"], "red_pajama_subset": ["wikipedia"] * 2}),
                   rp / "wikipedia" / "partial-train" / "0000.parquet")
    srcs = [SourceConfig(name="the-stack", path=str(stack), data_dir="data/python", text_field="content"),
            SourceConfig(name="redpajama", path=str(rp), data_dir="wikipedia/partial-train")]
    from openmoe.data.sources import raw_examples

    assert [e["content"] for e in raw_examples(srcs[0])] == [f"python file {i}.{j}" for i in range(2) for j in range(3)]
    assert [e["text"] for e in raw_examples(srcs[1])] == ["wiki a", "wiki b"]
    m = PackedMixture(srcs, lambda t: [3 + ord(c) % 50 for c in t], 8, 2, seed=0)
    m.next_batch()
    assert sum(m.docs_per_source) >= 2


def test_pretrain_recipe_names_loadable_sources():
    # datasets >= 4 loads no scripts: RedPajama-1T only through its parquet branch, else a successor
    import yaml

    cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../configs/train/pretrain_base.yaml")))
    srcs = {s["name"]: SourceConfig.from_dict(s) for s in cfg["data"]}
    rp = srcs["redpajama"]
    assert rp.path == "cerebras/SlimPajama-627B" or rp.revision == "refs/convert/parquet"
    assert srcs["the-stack"].path == "bigcode/the-stack-dedup" and srcs["the-stack"].data_dir.startswith("data/")


def test_worker_tokenization_resumes_exactly_across_worker_counts(corpus):
    d, model, out = corpus
    tok = TextTokenizer(model)

    def mix(workers):
        return PackedMixture([SourceConfig(name="rp", path=str(d / "rp.jsonl"), weight=0.7, workers=workers),
                              SourceConfig(name="t", path=out, weight=0.3)], tok.encode, 64, 8, seed=2)

    ref = mix(0)  # in-process, the plain DocumentStream
    want = [ref.next_batch() for _ in range(20)]
    ref_state = json.loads(json.dumps(ref.state()))
    want += [ref.next_batch() for _ in range(50)]  # crosses epochs of the jsonl source
    w2 = mix(2)
    for x in want[:20]:
        assert _same(x, w2.next_batch())
    state = json.loads(json.dumps(w2.state()))
    assert state == ref_state  # read-ahead is not in the state: the same position as in-process
    w2.close()
    w1 = mix(1)
    w1.load_state(state)  # saved with 2 workers, resumed with 1
    for x in want[20:]:
        assert _same(x, w1.next_batch())
    assert w1.streams[0].epoch >= 1
    w1.close()


@pytest.mark.timeout(120)
def test_a_dead_tokenizer_worker_is_an_error_not_a_hang(corpus):
    # multiprocessing.Pool lost the chunk a killed worker held and waited forever (seen once in a
    # full run); the stream must say what happened in one line instead
    import multiprocessing as mp
    import signal

    from openmoe.data.workers import TokenizingStream

    d, model, _ = corpus
    tok = TextTokenizer(model)
    s = TokenizingStream(SourceConfig(name="rp", path=str(d / "rp.jsonl"), workers=1), tok.encode, chunk=4)
    before = {p.pid for p in mp.active_children()}
    s.next()
    workers = {p.pid for p in mp.active_children()} - before
    assert len(workers) == 1
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(DataError, match="rp.*tokenizer worker process died.*workers"):
        for _ in range(10_000):  # what was read ahead before the kill comes out first
            s.next()
    s.close()
