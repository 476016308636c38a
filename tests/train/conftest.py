"""Trainer and data-preparation tests: one thread, a fresh accelerate state per test."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.tiny_training import RESOLUTION


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster on a busy machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic FGID set (8 rows, 4 identities) at the tiny trainer's resolution."""
    from train.synthetic import write_synthetic_set

    return write_synthetic_set(tmp_path_factory.mktemp("fgid"), count=8, identities=4, size=RESOLUTION)
