import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import openmoe  # noqa: F401  (registers the Auto classes)
from helpers import make_run_setup, tiny_config  # noqa: F401

torch.set_num_threads(2)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def run_setup(tmp_path):
    """A tiny model config folder, a tokenizer and two local sources; returns train.py flags."""
    return make_run_setup(tmp_path)
