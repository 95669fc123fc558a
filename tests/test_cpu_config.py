"""What makes the project usable on a CPU: --preset cpu, the automatic critic chunk, the first epoch's projection and
evaluate.py --curve, on a tiny real run."""
import json

import numpy as np
import pytest
import torch

import evaluate
import models
import train_lstm_gan
from arg_parser import PRESETS, build_parser, parse_arg
from runtime import CRITIC_BYTES_PER_UNIT, auto_critic_chunk, chunk_count


def test_preset_cpu_sets_its_defaults_and_typed_flags_win():
    paper = parse_arg([])
    assert paper.preset == "paper" and paper.model_scale == 1.0 and paper.batch_size == 64   # the paper's defaults
    cpu = parse_arg(["--preset", "cpu"])
    for key, value in PRESETS["cpu"].items():
        assert getattr(cpu, key) == value, key
    typed = parse_arg(["--preset", "cpu", "-b", "32", "--model-scale", "0.25", "-dts", "5"])
    assert (typed.batch_size, typed.model_scale, typed.discriminator_train_steps) == (32, 0.25, 5)
    assert typed.norm_layout == PRESETS["cpu"]["norm_layout"]
    assert all(build_parser().get_default(k) != v for k, v in PRESETS["cpu"].items())   # it really changes them


def test_mixed_noise_holds_half_the_channels_for_the_whole_sequence():
    torch.manual_seed(0)
    step, mixed = (models.Generator(8, 3, 12, scale=0.02, noise=n).eval() for n in ("step", "mixed"))
    mixed.load_state_dict(step.state_dict())   # same parameters: the option changes only what the LSTMs see
    z = torch.randn(2, 12, 8)
    later_held = z.clone()
    later_held[:, 1:, :4] += 1.0               # the held half at steps 1.. is never read
    first_held = z.clone()
    first_held[:, 0, :4] += 1.0                # its first step's values are the sequence's latent
    with torch.no_grad():
        assert torch.equal(mixed(later_held), mixed(z))
        assert not torch.allclose(mixed(first_held)[:, -1], mixed(z)[:, -1])
        assert not torch.allclose(step(later_held), step(z))   # the paper's generator reads every step


def test_smooth_noise_is_slow_unit_noise_and_mixed_otherwise():
    torch.manual_seed(0)
    z = torch.randn(512, 300, 4)
    slow = models.ar1(z, 30)
    assert abs(slow.std().item() - 1) < 0.05                                   # still N(0, 1) at every step
    for lag in (1, 10, 30):
        corr = (slow[:, lag:] * slow[:, :-lag]).mean().item()
        assert abs(corr - np.exp(-lag / 30)) < 0.05, lag                       # correlation exp(-lag / 30)
    assert abs((z[:, 10:] * z[:, :-10]).mean().item()) < 0.02                 # the i.i.d. input has none
    mixed, smooth = (models.Generator(8, 3, 12, scale=0.02, noise=n).eval() for n in ("mixed", "smooth"))
    smooth.load_state_dict(mixed.state_dict())
    z = torch.randn(2, 12, 8)
    held_only = z.clone()
    held_only[:, :, 4:] = 0                    # no varying half: both are the same function of the held half
    with torch.no_grad():
        assert torch.equal(smooth(held_only), mixed(held_only))
        assert not torch.allclose(smooth(z), mixed(z))


def test_noise_time_steps_sets_the_smooth_noise_time_constant(monkeypatch):
    """--noise-time-steps reaches the generator's AR(1) noise (30 by default: the runs made before the flag)."""
    calls = []
    monkeypatch.setattr(models, "ar1", lambda z, steps: calls.append(steps) or z)
    z = torch.randn(2, 12, 8)
    cases = (([], 30.0), (["--preset", "cpu"], 100.0), (["--preset", "cpu", "--noise-time-steps", "7"], 7.0))
    for argv, expected in cases:
        args = parse_arg(["-gid", "8", "--generator-noise", "smooth", *argv])
        with torch.no_grad():
            models.build_generator(args, 12).eval()(z)
        assert calls.pop() == expected


def test_layer_critic_norm_normalises_each_step_over_features():
    torch.manual_seed(0)
    instance = models.Discriminator(3, scale=0.05)
    layer = models.Discriminator(3, scale=0.05, norm="layer")
    layer.load_state_dict(instance.state_dict())   # parameter-free: the original's state dicts load
    x = torch.rand(2, 9, 3)
    h = x
    for i in range(1, 5):
        h, _ = getattr(layer, f"lstm_{i}")(h)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        h = torch.nn.functional.leaky_relu(h, 0.2)
    torch.testing.assert_close(layer(x), layer.linear(h[:, -1]))
    # a level shift of one sequence survives per-step normalisation, but not the channel layout's InstanceNorm,
    # which takes each channel's mean over time away
    shifted = x + torch.tensor([0.3, 0.0, 0.0])
    assert not torch.allclose(layer(shifted), layer(x))


def test_mean_and_meanstd_readouts_score_every_step():
    torch.manual_seed(0)
    last = models.Discriminator(3, scale=0.05, norm="layer")
    mean = models.Discriminator(3, scale=0.05, norm="layer", readout="mean")
    mean.load_state_dict(last.state_dict())   # same parameters: only where the head reads
    x = torch.rand(2, 9, 3, requires_grad=True)
    h = x
    for i in range(1, 5):
        h, _ = getattr(mean, f"lstm_{i}")(h)
        h = torch.nn.functional.leaky_relu(torch.nn.functional.layer_norm(h, h.shape[-1:]), 0.2)
    torch.testing.assert_close(mean(x), mean.linear(h.mean(1)))
    # the paper's readout judges the first steps only through the recurrence; the mean reaches them directly
    g_last, = torch.autograd.grad(last(x).sum(), x)
    g_mean, = torch.autograd.grad(mean(x).sum(), x)
    share = lambda g: (g[:, :3].abs().sum() / g.abs().sum()).item()
    assert share(g_mean) > share(g_last)
    # meanstd: the mean and the standard deviation over time of every feature go to a head twice as wide
    spread = models.Discriminator(3, scale=0.05, norm="layer", readout="meanstd")
    assert spread.linear.in_features == 2 * last.linear.in_features
    stats = torch.cat([h.mean(1), torch.sqrt(h.var(1, unbiased=False) + 1e-8)], dim=1)
    for name in ("lstm_1", "lstm_2", "lstm_3", "lstm_4"):
        getattr(spread, name).load_state_dict(getattr(mean, name).state_dict())
    torch.testing.assert_close(spread(x), spread.linear(stats))


def test_auto_critic_chunk_follows_memory():
    per_sample = CRITIC_BYTES_PER_UNIT * 600 * 1920   # the paper's critic over 600 steps: ~280 MB per sample
    assert auto_critic_chunk(64, 600, 1920, 64 * per_sample) == 0          # the whole batch fits
    assert auto_critic_chunk(64, 600, 1920, 11 * 2**30) == 42               # the 24 GB machine: half its memory
    assert chunk_count(64, 42) == 2                                         # -> two chunks of 32
    assert auto_critic_chunk(64, 600, 1920, 8 * per_sample + 1) == 8
    assert auto_critic_chunk(64, 600, 1920, 0) == 2                         # never a single sample (InstanceNorm)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, soc_model, tmp_path_factory):
    results = tmp_path_factory.mktemp("cpu") / "results"
    argv = ["-d", str(tiny_data), "-socmp", str(soc_model.parent), "-socm", soc_model.name, "-socs", "20",
            "--results-dir", str(results), "--device", "cpu", "--seed", "3", "--preset", "cpu",
            "--model-scale", "0.0625", "-b", "4", "-gid", "8", "-e", "6", "-s", "2", "-ess", "6"]
    assert train_lstm_gan.main(argv) == 0
    [run] = list(results.iterdir())
    return run


def test_preset_run_records_the_chunk_and_projects_the_run(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["args"]["preset"] == "cpu" and config["args"]["norm_layout"] == "channel"
    assert (config["args"]["critic_norm"], config["args"]["critic_readout"], config["args"]["generator_noise"]) \
        == ("layer", "meanstd", "smooth")
    assert config["args"]["noise_time_steps"] == 100.0
    assert config["args"]["critic_chunk"] == 0   # picked: 4 tiny samples fit in any memory


def test_first_epoch_projection_is_printed(tiny_data, soc_model, tmp_path, capsys):
    argv = ["-d", str(tiny_data), "-socmp", str(soc_model.parent), "-socm", soc_model.name, "-socs", "20",
            "--results-dir", str(tmp_path), "--device", "cpu", "--seed", "3", "--model-scale", "0.0625", "-b", "4",
            "-gid", "8", "-e", "2", "-s", "10", "-ess", "4"]
    assert train_lstm_gan.main(argv) == 0
    out = capsys.readouterr().out
    assert "critic chunk: whole batch of 4 samples" in out
    assert "first epoch: " in out and " s of training; 2 epochs at this pace: " in out


def test_curve_draws_every_snapshot_metric_with_its_floor(tiny_run, capsys, monkeypatch):
    assert evaluate.main(["-r", tiny_run.name, "--results-dir", str(tiny_run.parent), "--curve"]) == 0
    assert (tiny_run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((tiny_run / "curve.json").read_text())
    assert curve["epochs"] == [2, 4, 6]
    snapshot = json.loads((tiny_run / "4_epoch" / "metrics.json").read_text())
    assert curve["metrics"]["w1_mean"][1] == snapshot["w1_mean"]
    assert set(curve["metrics"]) == {k for k in snapshot if not k.startswith("real_")}
    # the floor: real against real at the snapshots' size, far below an almost untrained generator
    assert curve["floor_windows"] == 6 and np.isfinite(curve["floor"]["w1_mean"])
    assert curve["floor"]["w1_mean"] < min(curve["metrics"]["w1_mean"])
    assert not list(tiny_run.glob(".*tmp*"))
    assert f"wrote {tiny_run / 'curve.png'}" in capsys.readouterr().out
    # the labelled floor: the same real V, I, T, only the SOC is the estimator's (here an untrained one)
    labelled = curve["floor_labelled"]
    assert all(labelled[f"w1_{f}"] == curve["floor"][f"w1_{f}"] for f in "VIT")
    assert labelled["w1_SOC"] > curve["floor"]["w1_SOC"]
    # kept in curve.json: a second curve does not label again
    monkeypatch.setattr(evaluate, "load_soc", lambda *a: pytest.fail("labelled the floor again"))
    assert evaluate.main(["-r", tiny_run.name, "--results-dir", str(tiny_run.parent), "--curve"]) == 0
    assert json.loads((tiny_run / "curve.json").read_text())["floor_labelled"] == labelled


def test_curve_without_snapshots_is_one_line(tiny_data, soc_model, tmp_path, capsys):
    argv = ["-d", str(tiny_data), "-socmp", str(soc_model.parent), "-socm", soc_model.name, "-socs", "20",
            "--results-dir", str(tmp_path), "--device", "cpu", "--model-scale", "0.0625", "-b", "4", "-gid", "8",
            "-e", "1", "-s", "5"]
    assert train_lstm_gan.main(argv) == 0
    [run] = list(tmp_path.iterdir())
    assert evaluate.main(["-r", run.name, "--results-dir", str(tmp_path), "--curve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no saved epoch" in err[0]
