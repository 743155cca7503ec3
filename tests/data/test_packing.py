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
    assert p._labels == [1]  # the eos after a trained token is trained
