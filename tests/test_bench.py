"""bench.py at tiny scale: the JSON lines carry the documented keys, and the reference (the original loop) and the
fast path (the trainer's steps) give the same losses for the same seed and batches. Timings are not asserted."""
import json

import numpy as np
import pytest
import torch

import bench
from common import UserError
from runtime import bf16_lstm_supported

BF16_RTOL = 2e-2   # bf16 autocast against fp32 over 3 epochs of a tiny run (measured: < 5e-3)


@pytest.fixture()
def tiny():
    """A tiny config (the --quick shapes) and a WGANGP plus reference built from it in memory."""
    cfg = bench.parse(["--device", "cpu", "--quick"])
    cfg.steps, cfg.warmup, cfg.label_seqs = 2, 1, 2
    gan = bench.make_gan(cfg)
    return cfg, gan, bench.Reference(gan, cfg)


def test_training_lines_have_the_documented_keys(tiny):
    cfg, gan, reference = tiny
    lines = bench.measure_training(cfg, gan, reference)
    assert [(l["measure"], l["impl"]) for l in lines] == [
        ("critic_step", "fast"), ("critic_step", "reference"), ("generator_step", "fast"),
        ("generator_step", "reference")]
    for l in lines:
        assert set(bench.KEYS) <= set(l), set(bench.KEYS) - set(l)
        assert json.loads(json.dumps(l)) == l   # plain JSON
        assert l["device"] == "cpu" and l["dtype"] == "float32" and l["batch"] == cfg.batch
        assert l["steps"] == 2 and len(l["seconds_all"]) == 2 and l["seconds"] > 0
        assert l["peak_memory_bytes"] > 0 and l["memory_kind"] == "rss_high_water"
        assert l["ratio_reference_over_fast"] > 0


def test_labelling_line(tiny):
    cfg, _, _ = tiny
    l = bench.measure_labelling(cfg, bench.random_soc_estimator(cfg))
    assert set(bench.KEYS) <= set(l)
    assert l["measure"] == "soc_label" and l["window"] == cfg.seq_len // 2
    assert l["windows"] == 2 * (cfg.seq_len - l["window"] + 1) and l["windows_per_s"] > 0


@pytest.mark.parametrize("chunk", [0, 1, 3])   # 3: 6 uneven chunks (2 or 3 samples); 1: clamped to 2
def test_reference_and_fast_give_the_same_losses(chunk, device):
    cfg = bench.parse(["--device", device, "--quick"])
    cfg.steps, cfg.warmup, cfg.label_seqs = 2, 1, 2
    gan = bench.make_gan(cfg)
    reference = bench.Reference(gan, cfg)
    gan.settings.critic_chunk = chunk
    check = bench.check_equal_losses(cfg, gan, reference)
    assert check["equal"], check
    assert len(check["losses_fast"]) == cfg.check_steps + 1
    assert check["max_rel_diff"] < bench.LOSS_RTOL
    # ... and not because nothing was computed: training moves the losses
    assert check["losses_fast"][0] != check["losses_fast"][1]


def test_main_prints_one_json_line_per_measurement(capsys):
    results = bench.main(["--device", "cpu", "--quick"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == results
    assert [r["measure"] for r in printed] == ["critic_step", "critic_step", "generator_step", "generator_step",
                                               "soc_label", "equal_losses"]
    assert printed[-1]["equal"]


def test_bf16_losses_stay_close_to_fp32_or_is_refused():
    """On a CPU with oneDNN bf16 LSTM kernels, bf16 runs close to fp32; on one without, the trainer refuses it
    with a one-line error (it used to crash in the first critic step)."""
    if not bf16_lstm_supported(torch.device("cpu")):
        cfg = bench.parse(["--device", "cpu", "--quick", "--precision", "bf16"])
        with pytest.raises(UserError, match="--precision bf16: this CPU has no bfloat16 LSTM"):
            bench.make_gan(cfg)
        return
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = bench.parse(["--device", "cpu", "--quick", "--precision", precision])
        gan = bench.make_gan(cfg)
        torch.manual_seed(0)
        losses[precision] = np.array([list(gan.train_epoch().values()) for _ in range(3)])
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=BF16_RTOL)
    assert not np.array_equal(losses["bf16"], losses["fp32"])   # autocast really ran in bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_cuda_graph_line_times_replays_that_train():
    """--cuda-graph: the captured critic step replays and keeps training (an error line would hide a broken
    capture; the first GPU run of it failed on its own timing line)."""
    line = bench.main(["--device", "cuda", "--quick", "--impl", "fast", "--check-steps", "0", "--label-seqs", "0",
                       "--cuda-graph"])[-1]
    assert line["measure"] == "critic_step_cuda_graph" and "error" not in line, line
    assert line["finite"] and line["moved"] and line["seconds"] > 0
