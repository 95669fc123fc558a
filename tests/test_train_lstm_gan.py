"""The GAN trainer: CLI, networks, WGAN-GP loop, results folder, checkpoint/resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import arg_parser
import common
import run_dir
from extensions import voltage_residual
from helpers import read_losses, run_dirs, stop_training, tiny_args
from metrics import resistance_line
from models import Discriminator, Generator, normalize
from train_lstm_gan import main
from wgan_gp import BatchSampler, gradient_penalty

ROOT = Path(__file__).resolve().parent.parent

# (short, long, default) of the paper's table (the tutorial's section 7.3)
PAPER_FLAGS = [
    ("-t", "--train-report-interval", 1), ("-b", "--batch-size", 64),
    ("-d", "--data-path", "./data/lg_600_data.npy"), ("-p", "--show-progress-bar", False),
    ("-r", "--resume-model-name", None), ("-s", "--save-epoch-interval", 1000),
    ("-n", "--result-notebook", "visualize_lstm_gan.ipynb"), ("-e", "--gan-epochs", 20000),
    ("-gid", "--generator-input-dim", 128), ("-dts", "--discriminator-train-steps", 5),
    ("-gp", "--gradient-penalty-lambda-term", 10.0), ("-gdr", "--generator-dropout", 0.0),
    ("-glr", "--generator-learning-rate", 0.0001), ("-gwd", "--generator-weight-decay", 0.0),
    ("-gab1", "--generator-adam-beta1", 0.5), ("-gab2", "--generator-adam-beta2", 0.999),
    ("-ddr", "--discriminator-dropout", 0.0), ("-dlr", "--discriminator-learning-rate", 0.0001),
    ("-dwd", "--discriminator-weight-decay", 0.0), ("-dab1", "--discriminator-adam-beta1", 0.5),
    ("-dab2", "--discriminator-adam-beta2", 0.999), ("-ess", "--evaluate-sample-size", 4000),
    ("-socs", "--soc-estimator-step", 300), ("-socmp", "--soc-estimator-model-path", "./soc_models/"),
    ("-socm", "--soc-estimator-model",
     "2021-01-12-23-17-13_lstm_soc_percentage_lg_positive_temp_300_steps_mixed_cycle_test.h5"),
]


# ---- CLI -------------------------------------------------------------------------------------------------------

def test_help_lists_every_paper_flag_with_its_default():
    parser = arg_parser.build_parser()
    help_text = parser.format_help()
    by_dest = {a.dest: a for a in parser._actions}
    for short, long, default in PAPER_FLAGS:
        assert f"{short}," in help_text or f"{short} " in help_text, short
        assert long in help_text, long
        action = next(a for a in parser._actions if long in a.option_strings)
        assert short in action.option_strings
        assert action.default == default, (long, action.default)
    assert len(PAPER_FLAGS) == 25
    assert by_dest["evaluate_sample_size"].option_strings[-1] == "--eval-sample-size"   # the code's spelling


def test_parser_rejects_non_positive_values_with_one_line(capsys):
    for flags in (["-e", "0"], ["-b", "-3"], ["-s", "0"], ["--model-scale", "0"], ["-gdr", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            arg_parser.parse_arg(flags)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err


# ---- networks ------------------------------------------------------------------------------------------------

def lstm_params(inp, hidden):
    return 4 * hidden * (inp + hidden) + 2 * 4 * hidden   # W_ih, W_hh and the two bias vectors


def test_parameter_counts_equal_the_original_networks():
    g_widths = [128, 1024, 512, 256, 128]
    expected_g = sum(lstm_params(a, b) + 2 * b for a, b in zip(g_widths, g_widths[1:])) + lstm_params(128, 3)
    d_widths = [3, 128, 256, 512, 1024]
    expected_d = sum(lstm_params(a, b) for a, b in zip(d_widths, d_widths[1:])) + 1024 + 1   # InstanceNorm: none
    assert sum(p.numel() for p in Generator(128, 3, 600).parameters()) == expected_g == 8_868_156
    assert sum(p.numel() for p in Discriminator(3).parameters()) == expected_d == 8_340_993


def test_paper_layout_reproduces_the_original_reshape_quirk():
    torch.manual_seed(0)
    b, t, c = 3, 5, 4
    x = torch.randn(b, t, c)
    norm = torch.nn.BatchNorm2d(c).train()
    got = normalize(x, norm, "paper")
    # by hand: each sample's [t*c] memory read as c rows of t values; each row index is a "channel"
    rows = x.reshape(b, c, t).numpy()
    mean = rows.mean(axis=(0, 2), keepdims=True)
    var = rows.var(axis=(0, 2), keepdims=True)
    expected = ((rows - mean) / np.sqrt(var + norm.eps)).transpose(0, 2, 1)
    np.testing.assert_allclose(got.detach().numpy(), expected, atol=1e-5)
    # ... which is not per-feature normalisation
    per_feature = normalize(x, torch.nn.BatchNorm2d(c).train(), "channel").detach().numpy()
    xf = x.numpy()
    np.testing.assert_allclose(per_feature, (xf - xf.mean((0, 1))) / np.sqrt(xf.var((0, 1)) + 1e-5), atol=1e-5)
    assert not np.allclose(per_feature, expected, atol=1e-3)


def test_instance_norm_matches_torch_and_has_right_gradients_for_one_sample():
    from models import InstanceNorm
    torch.manual_seed(0)
    x = torch.randn(3, 5, 1, 7)
    torch.testing.assert_close(InstanceNorm(5)(x), torch.nn.InstanceNorm2d(5)(x))
    one = torch.randn(1, 6, 8, dtype=torch.double, requires_grad=True)
    norm = InstanceNorm(8).double()
    assert torch.autograd.gradcheck(lambda v: normalize(v, norm, "paper"), (one,))
    assert torch.autograd.gradgradcheck(lambda v: normalize(v, norm, "channel"), (one,))


def test_dropout_really_applies():
    torch.manual_seed(0)
    g = Generator(8, 3, 10, dropout=0.5, scale=0.05).train()
    z = torch.randn(2, 10, 8)
    assert not torch.allclose(g(z), g(z))                      # dropout masks differ between calls
    g.eval()
    assert torch.allclose(g(z), g(z))
    d = Discriminator(3, dropout=0.5, scale=0.05).train()
    x = torch.randn(2, 10, 3)
    assert not torch.allclose(d(x), d(x))


class LinearCritic(torch.nn.Module):
    """critic(x) = sum(w * x): its gradient is w everywhere, so the penalty can be computed by hand."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).sum(dim=(1, 2)).unsqueeze(1)


def test_temperature_damping_scales_the_temperature_about_its_mean():
    """--temperature-damping D: T = its mean over the sequence + D x the free output's deviation; V and I and the
    mean untouched; D 0 holds T constant; the state dict is the free generator's."""
    torch.manual_seed(0)
    free = Generator(8, 3, 30, scale=1 / 64).eval()
    z = torch.randn(4, 30, 8)
    outputs = {}
    for damping in (1.0, 0.05, 0.0):
        g = Generator(8, 3, 30, scale=1 / 64, temperature_damping=damping).eval()
        g.load_state_dict(free.state_dict())
        with torch.no_grad():
            outputs[damping] = g(z)
    x, damped, flat = outputs[1.0], outputs[0.05], outputs[0.0]
    assert torch.equal(damped[:, :, :2], x[:, :, :2])
    level = x[:, :, 2:].mean(1, keepdim=True)
    assert torch.allclose(damped[:, :, 2:].mean(1, keepdim=True), level, atol=1e-6)
    assert torch.allclose(damped[:, :, 2:] - level, 0.05 * (x[:, :, 2:] - level), atol=1e-6)
    assert x[:, :, 2].std(1).min() > 1e-3 and torch.allclose(flat[:, :, 2], level.expand(-1, 30, -1)[:, :, 0])


def test_gradient_penalty_norms_by_hand():
    torch.manual_seed(0)
    w = torch.randn(6, 3)
    real, fake = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    critic = LinearCritic(w)
    paper = gradient_penalty(critic, real, fake, 10.0, "paper").item()
    sample = gradient_penalty(critic, real, fake, 10.0, "sample").item()
    assert paper == pytest.approx(10 * ((w.norm(dim=0) - 1) ** 2).mean().item(), rel=1e-5)   # over time
    assert sample == pytest.approx(10 * (w.norm() - 1).item() ** 2, rel=1e-5)                # per sample
    # a short batch (the original sized eta from the configured batch and crashed)
    assert gradient_penalty(critic, real[:1], fake[:1], 10.0).item() == pytest.approx(paper, rel=1e-5)


def test_voltage_residual_ignores_the_resistance_line_and_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.rand(3, 50, 6, dtype=torch.float64)
    r = voltage_residual(x)
    # a level and any resistance (V + a + b I) leave it unchanged; the metric's spread is its standard deviation
    shifted = x.clone()
    shifted[..., 0] += torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)[:, None] + 0.7 * x[..., 1]
    assert torch.allclose(voltage_residual(shifted), r, atol=1e-12)
    spread = resistance_line(x[..., 0].numpy(), x[..., 1].numpy())[1].std(1)
    np.testing.assert_allclose(r.std(1, unbiased=False).numpy(), spread, rtol=1e-10)
    # a voltage that follows its current exactly has none; a constant current leaves the voltage's own wander
    line = x.clone()
    line[..., 0] = 4.0 - 0.05 * x[..., 1]
    assert voltage_residual(line).abs().max() < 1e-12
    rest = x.clone()
    rest[..., 1] = 0.5
    assert torch.allclose(voltage_residual(rest), x[..., 0] - x[..., 0].mean(1, keepdim=True))


def test_critic_residual_channel_is_read_and_differentiated_by_the_penalty():
    torch.manual_seed(0)
    plain, with_res = Discriminator(6, scale=0.03, norm="layer", readout="meanstd"), \
        Discriminator(6, scale=0.03, norm="layer", readout="meanstd", residual=10.0)
    assert with_res.lstm_1.input_size == plain.lstm_1.input_size + 1 == 7
    x = torch.rand(4, 30, 6)
    # the residual is its only extra input: zero its weights and the score is the plain critic's
    with torch.no_grad():
        state = {k: v.clone() for k, v in with_res.state_dict().items()}
        state["lstm_1.weight_ih_l0"] = state["lstm_1.weight_ih_l0"][:, :6]
        plain.load_state_dict(state)
        with_res.lstm_1.weight_ih_l0[:, 6] = 0
    assert torch.allclose(with_res(x), plain(x), atol=1e-6)
    torch.manual_seed(1)
    with torch.no_grad():
        with_res.lstm_1.weight_ih_l0[:, 6].normal_()
    # the gradient penalty's double backward runs through the residual to its weights
    real, fake = torch.rand(4, 30, 6), torch.rand(4, 30, 6)
    gp = gradient_penalty(with_res, real, fake, 10.0, "sample", features=3)
    gp.backward()
    assert torch.isfinite(gp) and with_res.lstm_1.weight_ih_l0.grad[:, 6].abs().sum() > 0


def test_sampler_makes_persistent_passes_with_a_short_last_batch():
    s = BatchSampler(10, 4, seed=1)
    batches = [s.next_indices() for _ in range(6)]
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    state = s.state_dict()
    after = [s.next_indices() for _ in range(4)]
    s2 = BatchSampler(10, 4, seed=99)
    s2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [s2.next_indices() for _ in range(4)]))


# ---- end to end ------------------------------------------------------------------------------------------------

def test_tiny_run_creates_the_whole_results_folder(tiny_data, soc_model, tmp_path, device):
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "4", "-s", "2", "-p", "--device", device)) == 0
    [run] = run_dirs(results)
    assert run.name.endswith("_lstm_gan") and run.name.split("_")[0].isdigit()
    for name in ("config.json", "result.ipynb", "losses.csv", "checkpoint.pt", "best_generator.pth",
                 "best_discriminator.pth", "best_generator.json", "best_discriminator.json"):
        assert (run / name).is_file(), name
    rows = read_losses(run)
    assert rows[0] == ["epoch", "g_loss", "d_loss", "d_real", "d_fake", "gp"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert all(np.isfinite(float(v)) for r in rows[1:] for v in r[1:])
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 7 and config["device"].startswith(device) and len(config["data_sha256"]) == 64
    assert config["args"]["gan_epochs"] == 4 and "torch" in config["versions"]
    for epoch in (2, 4):
        folder = run / f"{epoch}_epoch"
        fake = np.load(folder / "fake_data.npy")
        # T = 40, socs = 20: L = min(20, 40 - 20) = 20 steps (19..38) plus SOC
        assert fake.shape == (12, 20, 4) and np.isfinite(fake).all()
        for name, rows_expected in (("pca_real", 12), ("pca_fake", 12), ("tsne_real", 12), ("tsne_fake", 12)):
            assert np.load(folder / f"{name}.npy").shape == (rows_expected, 2)
        quality = json.loads((folder / "metrics.json").read_text())
        assert {"w1_V", "w1_SOC", "mmd2_rbf_flat", "acf_diff_mean"} <= set(quality)
        assert all(np.isfinite(v) for v in quality.values())
        state = torch.load(folder / "generator.pth")
        assert not any(k.startswith("module.") for k in state)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 4 and set(ckpt) >= {"generator", "discriminator", "g_optim", "d_optim", "rng", "best"}
    best = json.loads((run / "best_generator.json").read_text())
    g_losses = [float(r[1]) for r in rows[1:]]
    assert best == {"loss": min(g_losses), "epoch": 1 + g_losses.index(min(g_losses))}
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))


def test_fake_data_soc_column_comes_from_the_estimator(tiny_data, soc_model, tmp_path):
    from soc_estimator import SOCEstimator
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "1", "-s", "1")) == 0
    [run] = run_dirs(results)
    fake = np.load(run / "1_epoch" / "fake_data.npy")
    # the stored steps 19..38 are exactly the 20-step window that ends at the last stored step
    soc_last = SOCEstimator.load(soc_model).label(fake[:, :, :3], window=20)[:, 0]
    np.testing.assert_allclose(fake[:, -1, 3], soc_last, atol=1e-5)


def test_snapshots_with_fused_labels_and_back_on_resume(tiny_data, soc_model, tmp_path):
    """--soc-labels fused: the snapshot's fake_data.npy keeps the paper's steps (19..38 of 40), its labels follow
    charge counting to float precision, each sequence's spread in soc_spread.npy; fake_data.npy.json and config.json
    say which labels; not an architecture flag: a resume may go back to the estimator's labels."""
    from helpers import SCALER, make_tiny_run
    from soc_estimator import counted_soc
    import metrics
    run = make_tiny_run(tiny_data, soc_model, tmp_path / "results", "-e", "1", "-s", "1", "--soc-labels", "fused")
    folder = run / "1_epoch"
    fake, spread = np.load(folder / "fake_data.npy"), np.load(folder / "soc_spread.npy")
    assert fake.shape == (12, 20, 4) and spread.shape == (12,) and np.isfinite(spread).all()
    np.testing.assert_allclose(np.diff(fake[..., 3], axis=1), np.diff(counted_soc(fake, SCALER), axis=1), rtol=0,
                               atol=2.5e-7)
    assert metrics.coulomb_gap(fake, SCALER).max() < 1e-4
    record = json.loads((folder / "fake_data.npy.json").read_text())
    assert record["soc_labels"] == "fused" and record["steps_kept"] == "paper"
    assert record["soc_fused"]["reading_steps"] == [19, 26, 32, 39]
    assert json.loads((run / "config.json").read_text())["args"]["soc_labels"] == "fused"
    quality = json.loads((folder / "metrics.json").read_text())
    assert quality["soc_coulomb_error"] < 1e-4 and quality["phys_soc_rise_while_discharging"] == 0
    assert main(["-r", run.name, "--results-dir", str(run.parent), "-e", "2", "--soc-labels", "estimator"]) == 0
    assert json.loads((run / "2_epoch" / "fake_data.npy.json").read_text()) == {
        "soc_labels": "estimator", "soc_fused": None, "steps_kept": "paper"}
    assert not (run / "2_epoch" / "soc_spread.npy").exists()
    assert json.loads((run / "config.json").read_text())["args"]["soc_labels"] == "estimator"


def test_eval_metrics_all_adds_the_post_hoc_scores(tiny_data, soc_model, tmp_path):
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "1", "-s", "1", "--eval-metrics", "all")) == 0
    [run] = run_dirs(results)
    quality = json.loads((run / "1_epoch" / "metrics.json").read_text())
    assert {"w1_V", "discriminative_score", "predictive_mae"} <= set(quality)


def test_two_runs_in_the_same_second_get_different_folders(tiny_data, soc_model, tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir.time, "time", lambda: 1_700_000_000.0)
    results = tmp_path / "results"
    for _ in range(2):
        assert main(tiny_args(tiny_data, soc_model, results, "-e", "1")) == 0
    assert [p.name for p in run_dirs(results)] == ["1700000000_lstm_gan", "1700000001_lstm_gan"]


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_losses(tiny_data, soc_model, tmp_path, device):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    full = tmp_path / "full"
    args = tiny_args(tiny_data, soc_model, full, "-e", "12", "-s", "3", "--device", device)
    assert main(args) == 0
    [reference] = run_dirs(full)

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_lstm_gan.py"), *tiny_args(tiny_data, soc_model, killed, "-e", "12",
                                                                       "-s", "3", "--device", device)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:   # kill it between two checkpoints, with rows written after the last one
        runs = run_dirs(killed)
        if runs and (runs[0] / "checkpoint.pt").exists() and len(read_losses(runs[0])) - 1 >= 4 \
                and (len(read_losses(runs[0])) - 1) % 3 != 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [run] = run_dirs(killed)
    done = len(read_losses(run)) - 1
    assert done < 12, "the run finished before it could be killed; make it longer"
    assert main(["-r", run.name, "--results-dir", str(killed)]) == 0
    assert read_losses(run) == read_losses(reference)
    assert sorted(p.name for p in run.glob("*_epoch")) == sorted(p.name for p in reference.glob("*_epoch"))
    np.testing.assert_array_equal(np.load(run / "12_epoch" / "fake_data.npy"),
                                  np.load(reference / "12_epoch" / "fake_data.npy"))


def test_resume_can_extend_training(tiny_data, soc_model, tmp_path, device):
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "2", "--device", device)) == 0
    [run] = run_dirs(results)
    assert main(["-r", run.name, "--results-dir", str(results), "-e", "3"]) == 0
    assert [r[0] for r in read_losses(run)[1:]] == ["1", "2", "3"]
    assert json.loads((run / "config.json").read_text())["resumed"][0]["at_epoch"] == 2


def test_learning_rates_typed_on_resume_take_effect(tiny_data, soc_model, tmp_path):
    """The optimizers' state comes from the checkpoint, their hyperparameters from the flags: a -glr/-dlr typed on
    resume was silently replaced by the saved value when the optimizer state was loaded."""
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "2")) == 0
    [run] = run_dirs(results)
    assert main(["-r", run.name, "--results-dir", str(results), "-e", "3", "-glr", "3e-5", "-dlr", "2e-5"]) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in ckpt["g_optim"]["param_groups"]] == [3e-5]
    assert [g["lr"] for g in ckpt["d_optim"]["param_groups"]] == [2e-5]
    assert ckpt["g_optim"]["state"][0]["step"] == 3   # the moments and step counts carried on
    assert ckpt["g_optim"]["param_groups"][0]["betas"] == tuple(ckpt["args"][k] for k in (
        "generator_adam_beta1", "generator_adam_beta2"))


def test_resume_a_checkpoint_written_before_newer_flags_existed(tiny_data, soc_model, tmp_path):
    """A checkpoint whose saved args lack flags added later (--precision, --critic-chunk, --eval-metrics,
    --noise-time-steps) resumes with those flags' defaults; typed flags still apply (it crashed with AttributeError)."""
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "2")) == 0
    [run] = run_dirs(results)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for flag in ("precision", "critic_chunk", "eval_metrics", "noise_time_steps"):
        del ckpt["args"][flag]
    torch.save(ckpt, run / "checkpoint.pt")
    # an architecture flag newer than the run: the run was built with its default, so another value is refused
    assert main(["-r", run.name, "--results-dir", str(results), "-e", "3", "--noise-time-steps", "100"]) == 2
    assert main(["-r", run.name, "--results-dir", str(results), "-e", "3"]) == 0
    assert [r[0] for r in read_losses(run)[1:]] == ["1", "2", "3"]
    args = json.loads((run / "config.json").read_text())["args"]
    new_flags = (args["precision"], args["critic_chunk"], args["eval_metrics"], args["gan_epochs"])
    assert new_flags == ("fp32", 0, "quick", 3)
    assert args["model_scale"] == 0.0625 and args["seed"] == 7   # saved values kept


def test_init_from_starts_a_new_run_from_a_snapshot(tiny_data, soc_model, tmp_path):
    """--init-from <run>/<N>_epoch: a new folder whose networks start as the snapshot's (the generator also as its
    running average), epochs from 1, fresh optimizers, the snapshot's hashes in config.json; flags that -r refuses
    (--temperature-damping) may differ."""
    from train_lstm_gan import TrainLSTMGAN
    results, branched = tmp_path / "results", tmp_path / "branched"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "2", "-s", "2", "--generator-ema", "0.9")) == 0
    [run] = run_dirs(results)
    snapshot = run / "2_epoch"
    argv = tiny_args(tiny_data, soc_model, branched, "-e", "1", "--generator-ema", "0.9", "--seed", "3",
                     "--init-from", str(snapshot), "--temperature-damping", "0.1")
    trainer = TrainLSTMGAN(arg_parser.parse_arg(argv), argv)   # builds and checks, writes nothing
    assert not branched.exists()
    for name, nets in (("generator", [trainer.G, trainer.gan.G_ema]), ("discriminator", [trainer.D])):
        saved = torch.load(snapshot / f"{name}.pth", weights_only=True)
        for net in nets:
            assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert trainer.G.temperature_damping == 0.1 and trainer.start_epoch == 0
    assert main(argv) == 0
    [new] = run_dirs(branched)
    assert [r[0] for r in read_losses(new)[1:]] == ["1"]
    config = json.loads((new / "config.json").read_text())
    assert config["args"]["init_from"] == str(snapshot)
    assert config["init_from_sha256"]["generator.pth"] == common.sha256(snapshot / "generator.pth")
    ckpt = torch.load(new / "checkpoint.pt", weights_only=True)
    assert ckpt["g_optim"]["state"][0]["step"] == 1   # fresh moments, not the snapshot run's
    # -r may not change the damping: older snapshots would be read with the new value
    assert main(["-r", new.name, "--results-dir", str(branched), "--temperature-damping", "1"]) == 2


@pytest.mark.parametrize("case", ["missing", "other_shapes", "with_resume"])
def test_init_from_errors_are_one_line_and_write_nothing(case, tiny_data, soc_model, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "1", "-s", "1")) == 0
    [run] = run_dirs(results)
    before = common.sha256(run / "checkpoint.pt")
    branched, extra = tmp_path / "branched", ["--init-from", str(run / "1_epoch")]
    if case == "missing":
        extra = ["--init-from", str(run / "9_epoch")]
    elif case == "other_shapes":
        extra += ["-gid", "4"]
    elif case == "with_resume":
        extra += ["-r", run.name]
    capsys.readouterr()
    assert main(tiny_args(tiny_data, soc_model, branched, "-e", "1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert ("init-from" in err) if case == "with_resume" else ("generator.pth" in err)
    assert not branched.exists() and common.sha256(run / "checkpoint.pt") == before


# ---- bad input ---------------------------------------------------------------------------------------------------

def bad_npy(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.mark.parametrize("case", ["missing", "not_npy", "rank", "features", "nan", "short", "batch", "device",
                                  "gpu", "notebook", "soc_missing", "fused_no_capacity"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_data, soc_model, tmp_path, capsys):
    results = tmp_path / "results"
    good = np.load(tiny_data)
    data, extra = tiny_data, []
    if case == "missing":
        data = tmp_path / "nope.npy"
    elif case == "not_npy":
        data = tmp_path / "text.npy"
        data.write_text("not an array")
    elif case == "rank":
        data = bad_npy(tmp_path, "rank.npy", good[:, :, 0])
    elif case == "features":
        data = bad_npy(tmp_path, "features.npy", good[:, :, :2])
    elif case == "nan":
        broken = good.copy()
        broken[1, 2, 0] = np.nan
        data = bad_npy(tmp_path, "nan.npy", broken)
    elif case == "short":
        extra = ["-socs", "40"]
    elif case == "batch":
        extra = ["-b", "1000"]
    elif case == "device":
        extra = ["--device", "tpu"]
    elif case == "gpu":
        extra = ["--device", "cpu", "--gpus", "0"]
    elif case == "notebook":
        extra = ["-n", str(tmp_path / "missing.ipynb")]
    elif case == "soc_missing":
        extra = ["-socm", "missing.h5"]
    elif case == "fused_no_capacity":   # the tiny data has no sidecar: no scaler, no capacity to count charge with
        extra = ["--soc-labels", "fused"]
    code = main(tiny_args(data, soc_model, results, "-e", "1", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err, err
    assert not results.exists()


def test_resume_errors(tiny_data, soc_model, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["-r", "nope", "--results-dir", str(results)]) == 2
    assert "no such run" in capsys.readouterr().err
    (results / "123_lstm_gan").mkdir(parents=True)
    assert main(["-r", "123_lstm_gan", "--results-dir", str(results)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "1")) == 0
    run = [p for p in run_dirs(results) if p.name != "123_lstm_gan"][0]
    before = read_losses(run)
    assert main(["-r", run.name, "--results-dir", str(results), "--model-scale", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "incompatible architecture" in err and "\n" not in err
    assert main(["-r", run.name, "--results-dir", str(results), "--critic-residual", "10"]) == 2
    assert "critic_residual" in capsys.readouterr().err
    assert read_losses(run) == before


@pytest.mark.slow
def test_result_notebook_executes_headless_on_a_real_run(tiny_data, soc_model, tmp_path):
    results = tmp_path / "results"
    assert main(tiny_args(tiny_data, soc_model, results, "-e", "4", "-s", "2", "--execute-notebook")) == 0
    [run] = run_dirs(results)
    html = (run / "result.html").read_text()
    assert "Traceback" not in html and html.count("data:image/png") >= 4
    executed = json.loads((run / "result.ipynb").read_text())
    outputs = [o for cell in executed["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)


@pytest.mark.slow
def test_ctrl_c_finishes_the_epoch_and_checkpoints_it(tiny_data, soc_model, tmp_path):
    results = tmp_path / "results"
    code, out = stop_training(tiny_data, soc_model, results, signal.SIGINT)
    assert code == 130   # 128 + SIGINT, as shells expect (issue 16; it was 0)
    [run] = run_dirs(results)
    epochs = len(read_losses(run)) - 1
    assert 2 <= epochs < 500
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == epochs
    assert f"Stopped after epoch {epochs}; resume with: python train_lstm_gan.py -r {run.name}" in out


PENALTY_PEAK = """
import sys, torch
import common
from models import Discriminator
from wgan_gp import gradient_penalty

def status_kb(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
torch.set_num_threads(1)
capped = common.cap_heap_growth(256 << 10) if sys.argv[1] == "cap" else False
torch.manual_seed(0)
real, fake, critic = torch.rand(2, 300, 3), torch.rand(2, 300, 3), Discriminator(3, scale=0.25)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")   # resets the peak (VmHWM) to the current RSS: imports do not count
before = status_kb("VmRSS")
gradient_penalty(critic, real, fake, 10.0).backward()
print(capped, status_kb("VmHWM") - before)   # the penalty's own peak, kB
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_heap_cap_bounds_the_gradient_penalty_memory():
    """The reference's penalty (double backward through oneDNN's nn.LSTM) frees weight-sized blocks at every step;
    on glibc's default heap they fragment. bench.py's cap returns them: the threshold is scaled with the network
    (0.25 -> 256 kB) so the effect shows at a test's size."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def peak(mode):
        r = subprocess.run([sys.executable, "-c", PENALTY_PEAK, mode], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=True)
        capped, kb = r.stdout.split()
        return capped == "True", int(kb)
    (capped, with_cap), (_, without) = peak("cap"), peak("none")
    assert capped and with_cap < 0.7 * without, (with_cap, without)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"   # the user's own setting wins
    assert peak("cap")[0] is False



CHUNKED_HEAP = """
import torch
from models import Discriminator, Generator
from wgan_gp import WGANGP, WGANGPSettings

G, D = Generator(8, 3, 20, scale=0.0625), Discriminator(3, scale=0.0625)
def threshold(batch, chunk):
    return WGANGP(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()), torch.rand(16, 20, 3),
                  batch, 0, WGANGPSettings(critic_chunk=chunk)).mmap_threshold
print(threshold(16, 0), threshold(16, 16), threshold(16, 4))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_critic_step_in_chunks_caps_the_heap_on_the_cpu():
    """Each chunk's freed graph fragmented glibc's heap, so a step's RSS grew with the chunk count (16 x 300 at paper
    width in chunks of 4: 2.31 GB, 1.29 GB capped, README): WGANGP caps glibc's mmap threshold (the mechanism of
    the test above) only when it runs in chunks on the CPU; MALLOC_MMAP_THRESHOLD_ set by the user wins."""
    def thresholds(user_threshold):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        if user_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = user_threshold
        r = subprocess.run([sys.executable, "-c", CHUNKED_HEAP], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True)
        return r.stdout.split()
    assert thresholds(None) == ["None", "None", str(4 << 20)]
    assert thresholds(str(32 << 20)) == ["None", "None", "None"]
