"""Shared fixtures: a tiny slice of the shipped real LG windows, a random-weight SOC model file and tiny trained
runs. The helpers they use (and test modules import) live in tests/helpers.py."""
import os
from pathlib import Path

# Tiny shapes run fastest on one thread, and the CI machine's two cores are shared with subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from helpers import DEVICES, ROOT, make_tiny_run

torch.set_num_threads(1)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier in-process run (e.g. a CLI's --threads) set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """24 real windows of 40 steps (V, I, T, SOC) cut from data/lg_600_data.npy: real numbers, tiny shapes."""
    windows = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    path = tmp_path_factory.mktemp("data") / "tiny.npy"
    np.save(path, np.ascontiguousarray(windows[::80][:24, :40]))
    return path


@pytest.fixture(scope="session")
def soc_model(tmp_path_factory) -> Path:
    """The paper's SOC network with random weights, saved as a Keras .h5 by the project's writer."""
    from soc_estimator import SOCLSTM, save_keras_h5
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("soc") / "random_soc.h5"
    save_keras_h5(SOCLSTM(), path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_data, soc_model, tmp_path_factory) -> Path:
    """A tiny trained run of this test module's own (a module may write into it)."""
    return make_tiny_run(tiny_data, soc_model, tmp_path_factory.mktemp("run") / "results")


@pytest.fixture
def mini_lists(monkeypatch):
    """The paper's lists cut to the files of the real miniature raw folder tests/fixtures/mini (one train + one
    test file per temperature)."""
    import lg_dataset
    monkeypatch.setattr(lg_dataset, "PAPER_TRAIN_FILES",
                        {"0degC": ["589_Mixed1"], "10degC": ["567_Mixed1"], "25degC": ["551_Mixed1"]})
    monkeypatch.setattr(lg_dataset, "PAPER_TEST_FILES",
                        {"0degC": ["589_UDDS"], "10degC": ["576_UDDS", "582_LA92"], "25degC": ["551_UDDS"]})
