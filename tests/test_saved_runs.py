"""Networks and checkpoints written by the code before the trainer was split into modules (commit d632e74) load
and resume unchanged: a shipped generator (lg_cpu_conditional_bounded's, epoch 25) and a tiny conditional run
trained with every extension flag (tests/fixtures/runs/, made by that commit's code; expected.json holds what that
code generated from them and the losses of the epoch it trained on resume)."""
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import ROOT, read_losses
from sampling import generate, load_generator
from train_lstm_gan import main

RUNS = ROOT / "tests" / "fixtures" / "runs"
EXPECTED = json.loads((RUNS / "expected.json").read_text())
CPU = torch.device("cpu")


@pytest.mark.parametrize("run, epoch", [("lg_cpu_conditional_bounded", 25), ("tiny_conditional", 1)])
def test_a_generator_saved_before_the_split_generates_as_it_did(run, epoch):
    """Its state dict loads into the generator rebuilt from the run's config.json (every key, every shape), and two
    sequences of the classes 0 and 2 from seed 0 are those the old code drew, up to float rounding."""
    config = json.loads((RUNS / run / "config.json").read_text())
    generator = load_generator(config, RUNS / run / f"{epoch}_epoch", CPU)
    saved = torch.load(RUNS / run / f"{epoch}_epoch" / "generator.pth", weights_only=True)
    assert generator.state_dict().keys() == saved.keys()
    x = generate(generator, 2, 0, 2, CPU, np.array([0, 2]))
    expected = np.load(RUNS / f"{run}_generate.npy") if run == "lg_cpu_conditional_bounded" \
        else np.asarray(EXPECTED[f"{run}_generate"], np.float32)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    if run == "lg_cpu_conditional_bounded":
        assert float(np.float64(x).sum()) == pytest.approx(EXPECTED[f"{run}_generate_sum"], rel=1e-6)


def test_a_checkpoint_written_before_the_split_resumes_for_an_epoch_as_it_did(soc_model, tmp_path):
    """A copy of the tiny run (epoch 1: checkpoint, config.json, losses.csv) resumes with -r and trains epoch 2 to
    the losses the old code trained it to; epoch 1's row is kept as it was."""
    results = tmp_path / "results"
    shutil.copytree(RUNS / "tiny_conditional", results / "tiny_conditional")
    before = read_losses(results / "tiny_conditional")
    assert main(["-r", "tiny_conditional", "--results-dir", str(results), "-e", "2",
                 "-d", str(RUNS / "tiny_conditional.npy"), "-socmp", str(soc_model.parent),
                 "-socm", soc_model.name]) == 0
    rows = read_losses(results / "tiny_conditional")
    assert rows[:2] == before[:2] and [r[0] for r in rows[1:]] == ["1", "2"]
    expected = EXPECTED["tiny_conditional_resumed_row"].split(",")
    np.testing.assert_allclose(np.array(rows[2][1:], float), np.array(expected[1:], float), rtol=1e-5, atol=1e-7)
    assert (results / "tiny_conditional" / "2_epoch" / "generator.pth").is_file()
