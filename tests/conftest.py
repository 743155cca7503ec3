import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import openmoe  # noqa: F401  (registers the Auto classes)
from helpers import tiny_config  # noqa: F401

torch.set_num_threads(2)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
