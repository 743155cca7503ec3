"""openmoe/data/packing.py on hand cases."""

import torch

from openmoe.data import IGNORE, Document, Packer


def test_two_documents_in_one_row_and_a_cut():
    p = Packer(seq_len=6)
    p.add(Document([10, 11]))  # -> 0 10 11 1
    p.add(Document([20, 21, 22]))  # -> 0 20 21 22 1
    row = p.pop()
    assert row["input_ids"].tolist() == [0, 10, 11, 1, 0, 20]
    assert row["labels"].tolist() == [IGNORE, 10, 11, 1, IGNORE, 20]  # no loss on predicting a BOS
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1]
    p.add(Document([30]))
    row = p.pop()
    # the cut document continues: positions restart at 0 (no BOS), then the next document
    assert row["input_ids"].tolist() == [21, 22, 1, 0, 30, 1]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]
    assert row["labels"].tolist() == [21, 22, 1, IGNORE, 30, 1]


def test_train_mask_and_state_round_trip():
    p = Packer(seq_len=4)
    p.add(Document([5, 6, 7], train_mask=[False, True, True]))
    s = p.state()
    q = Packer(seq_len=4)
    q.load_state(s)
    a, b = p.pop(), q.pop()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["labels"].tolist() == [IGNORE, IGNORE, 6, 7]
    assert p.state()["labels"] == [1]  # the eos after a trained token is trained


def test_long_document_rows_and_state_match_row_by_row():
    # a document many rows long: positions restart at 0 in each row, the state is the leftover
    p = Packer(seq_len=4)
    p.add(Document(list(range(10, 20))))  # 0 10..19 1 -> 12 tokens
    p.add(Document([30]))
    rows = []
    while p.ready():
        rows.append(p.pop())
    assert [r["input_ids"].tolist() for r in rows] == [[0, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 1]]
    assert all(r["position_ids"].tolist() == [0, 1, 2, 3] for r in rows)
    assert p.state() == {"ids": [0, 30, 1], "labels": [IGNORE, 30, 1], "pos": [0, 1, 2]}
    q = Packer(seq_len=4)
    q.add(Document(list(range(10, 16))))  # 0 10..15 1 -> 8 tokens; leftover 13 14 15 1
    q.pop()
    assert q.state()["pos"] == [0, 1, 2, 3]  # the cut document restarts at 0 in the saved state too
