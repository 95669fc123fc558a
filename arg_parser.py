"""Command-line flags of train_lstm_gan.py, in four groups (-h shows them so; docs/flags.md is the full reference):
the paper's flags, run control, corrected variants, extensions; and the files two of them name (the SOC model, the
result notebook). --preset NAME reads presets/NAME.json, a JSON object of flag values (by dest, e.g.
"model_scale": 0.125) that become the defaults: typed flags still win. 'paper' is the paper's settings (no file)."""
import argparse
import json
from pathlib import Path

from common import OneLineParser, UserError, int_at_least, project_default, seed_type

PAPER_SOC_MODEL = "2021-01-12-23-17-13_lstm_soc_percentage_lg_positive_temp_300_steps_mixed_cycle_test.h5"
PRESET_DIR = Path(__file__).resolve().parent / "presets"
SHIPPED_SOC_MODEL = Path(__file__).resolve().parent / "soc_models" / "lg_positive_temp_300_steps.h5"
# flags that change the shapes or the meaning of the saved networks: a resumed run must keep them
ARCH_FLAGS = ("generator_input_dim", "model_scale", "norm_layout", "critic_norm", "critic_readout", "generator_noise",
              "noise_time_steps", "condition", "critic_residual", "temperature_damping", "temperature_bound",
              "generator_head", "cell_model")


def preset_names() -> list[str]:
    """'paper' and every presets/*.json."""
    return sorted({"paper", *(path.stem for path in PRESET_DIR.glob("*.json"))})


def read_preset(name: str) -> dict:
    """presets/<name>.json as {dest: value}; 'paper' without a file is {}."""
    path = PRESET_DIR / f"{name}.json"
    if name == "paper" and not path.exists():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable preset ({type(err).__name__}); fix the file or drop it") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a preset is a JSON object of flag values, e.g. {{\"model_scale\": 0.125}}")
    return values


def _readable_presets() -> dict[str, dict]:
    presets = {}
    for name in preset_names():
        try:
            presets[name] = read_preset(name)
        except UserError:   # reported when it is asked for (parse_arg), not when the module is imported
            pass
    return presets


PRESETS = _readable_presets()   # {name: {dest: value}} of the presets/ files, as read at import


_positive_int, _non_negative_int = int_at_least(1), int_at_least(0)


# The most that can be meant: beyond these a flag's value only overflows the losses to inf/NaN from the first
# epochs (e.g. --level-mmd 1e308) or asks for what the data cannot hold (a bound wider than its temperature range).
MAX_WEIGHT = 1000.0         # -gp and the extension terms' weights (used: -gp 10, --level-mmd 3-30)
MAX_RATE = 1.0              # learning rates and weight decays
MAX_MODEL_SCALE = 64.0      # 64x the paper's widths: far past any GPU's memory
MAX_NOISE_TIME_STEPS = 1e4  # steps; the windows have 600
MAX_TEMPERATURE_BOUND = 30.0   # degC: the training data's temperatures span 27 degC


def _number_in(low: float, high: float, low_open: bool = False):
    """An argparse type: a number in [low, high] ((low, high] when low_open), so never nan or inf."""
    def parse(text: str) -> float:
        value = float(text)
        if not ((value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], "
                                             f"got {text}")
        return value
    return parse


_weight, _rate = _number_in(0.0, MAX_WEIGHT), _number_in(0.0, MAX_RATE)


def _unit_interval(text: str) -> float:
    """[0, 1): dropout rates and Adam's betas."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _fraction(text: str) -> float:
    """[0, 1], both ends included (--temperature-damping: 0 holds, 1 leaves free)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _gpu_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids like 0,1 -- got {text!r}") from None


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's default after its help, where it has one (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_lstm_gan.py", usage="%(prog)s [-h] [flags]", formatter_class=_HelpWithDefaults,
                      description="Train the LSTM WGAN-GP of Wong et al. (Electronics 2023) on LG 18650HG2 windows. "
                                  "Full reference: docs/flags.md.")
    paper = p.add_argument_group("the paper's flags", "the 25 flags of the paper's table, with its names and "
                                 "defaults")
    run = p.add_argument_group("run control", "where and how a run trains, what it starts from and what it "
                               "evaluates; the networks and the loss stay the paper's")
    corrected = p.add_argument_group("corrected variants", "the paper's code as published by default; each of these "
                                     "corrects one of its choices (--preset cpu takes them all)")
    ext = p.add_argument_group("extensions", "this project's additions beyond the paper (the conditional GAN and "
                               "its terms); off by default")
    paper.add_argument("-t", "--train-report-interval", type=_positive_int, default=1,
                       help="interval of logging epoch result during training")
    paper.add_argument("-b", "--batch-size", type=_positive_int, default=64, help="batch size")
    paper.add_argument("-d", "--data-path", default="./data/lg_600_data.npy", help="data path")
    paper.add_argument("-p", "--show-progress-bar", action="store_true", default=False,
                       help="show a progress bar over epochs with ETA and current losses")
    paper.add_argument("-r", "--resume-model-name", default=None,
                       help="the result name under the results directory to resume training")
    paper.add_argument("-s", "--save-epoch-interval", type=_positive_int, default=1000,
                       help="epoch interval of saving model, checkpoint and evaluation (fake data, SOC labels, PCA, "
                            "t-SNE)")
    paper.add_argument("-n", "--result-notebook", default="visualize_lstm_gan.ipynb",
                       help="result notebook name that will copy to result directory")
    paper.add_argument("-e", "--gan-epochs", type=_positive_int, default=20000, help="number of epochs to train")
    paper.add_argument("-gid", "--generator-input-dim", type=_positive_int, default=128,
                       help="generator input dimension")
    paper.add_argument("-dts", "--discriminator-train-steps", type=_positive_int, default=5,
                       help="discriminator train steps")
    paper.add_argument("-gp", "--gradient-penalty-lambda-term", type=_weight, default=10.0,
                       help="gradient penalty lambda term")
    paper.add_argument("-gdr", "--generator-dropout", type=_unit_interval, default=0.0,
                       help="generator dropout rate, applied to the output of every LSTM block but the last "
                            "(the original passed it to single-layer nn.LSTM, which ignores it)")
    paper.add_argument("-glr", "--generator-learning-rate", type=_rate, default=0.0001,
                       help="generator learning rate")
    paper.add_argument("-gwd", "--generator-weight-decay", type=_rate, default=0.0,
                       help="generator weight decay")
    paper.add_argument("-gab1", "--generator-adam-beta1", type=_unit_interval, default=0.5, help="generator adam beta1")
    paper.add_argument("-gab2", "--generator-adam-beta2", type=_unit_interval, default=0.999, help="generator adam "
                                                                                                   "beta2")
    paper.add_argument("-ddr", "--discriminator-dropout", type=_unit_interval, default=0.0,
                       help="discriminator dropout rate, applied to the output of every LSTM block "
                            "(the original passed it to single-layer nn.LSTM, which ignores it)")
    paper.add_argument("-dlr", "--discriminator-learning-rate", type=_rate, default=0.0001,
                       help="discriminator learning rate")
    paper.add_argument("-dwd", "--discriminator-weight-decay", type=_rate, default=0.0,
                       help="discriminator weight decay")
    paper.add_argument("-dab1", "--discriminator-adam-beta1", type=_unit_interval, default=0.5,
                       help="discriminator adam beta1")
    paper.add_argument("-dab2", "--discriminator-adam-beta2", type=_unit_interval, default=0.999,
                       help="discriminator adam beta2")
    # The original code spells two long names differently from the paper's table; both are accepted.
    paper.add_argument("-ess", "--evaluate-sample-size", "--eval-sample-size", dest="evaluate_sample_size",
                       type=_positive_int, default=4000, help="the generate data sample size on evaluation")
    paper.add_argument("-socs", "--soc-estimator-step", type=_positive_int, default=300,
                       help="the soc estimator step size (window length)")
    paper.add_argument("-socmp", "--soc-estimator-model-path", default="./soc_models/",
                       help="the pre-trained soc estimator model path")
    paper.add_argument("-socm", "--soc-estimator-model", "-socmn", "--soc-estimator-model-name",
                       dest="soc_estimator_model", default=PAPER_SOC_MODEL,
                       help="the pre-trained soc estimator model name (when the paper's file is absent, "
                            "the model shipped in soc_models/ is used)")
    run.add_argument("--preset", choices=preset_names(), default="paper",
                     help="take the flag values of presets/PRESET.json as the defaults (typed flags still win): "
                          "paper: the paper's settings (no file); cpu: the same model and loop sized for a 2-core "
                          "CPU (1/8 of the widths, batch 16, one critic step per generator step, Adam 1e-3, the "
                          "corrected variants)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto picks CUDA when present)")
    run.add_argument("--gpus", type=_gpu_ids, default=None,
                     help="GPU ids for DataParallel, e.g. 0,1 (default: all visible GPUs)")
    run.add_argument("--init-from", default=None, metavar="SNAPSHOT",
                     help="start a new run from the networks of a snapshot folder, <run>/<N>_epoch (its generator.pth, "
                          "also as the running average of --generator-ema, and discriminator.pth), with fresh "
                          "optimizers and epochs counted from 1: to train on from a chosen snapshot, or with flags "
                          "that -r refuses to change (e.g. --temperature-damping); the networks' shapes must match")
    run.add_argument("--seed", type=seed_type, default=None,
                     help="random seed, 0 .. 2**63 - 1 (a random one is drawn and recorded if unset)")
    run.add_argument("--results-dir", default="./results", help="folder that holds the run folders")
    run.add_argument("--model-scale", type=_number_in(0.0, MAX_MODEL_SCALE, low_open=True), default=1.0,
                     help="scale every hidden width (1.0 = the paper's network; e.g. 0.125 for a CPU demo)")
    corrected.add_argument("--norm-layout", choices=["paper", "channel"], default="paper",
                           help="paper: the original reshape(B, C, 1, T) before Batch/InstanceNorm (mixes time and "
                                "features, reproduced exactly); channel: normalise per feature channel")
    corrected.add_argument("--critic-norm", choices=["instance", "layer"], default="instance",
                           help="instance: the original InstanceNorm after each critic LSTM (laid out by "
                                "--norm-layout); layer: normalise each time step over its features (parameter-free "
                                "layer norm, the WGAN-GP paper's choice for a critic), which keeps each sequence's "
                                "levels visible")
    corrected.add_argument("--critic-readout", choices=["last", "mean", "meanstd"], default="last",
                           help="last: the critic scores the last time step's features (the paper); mean: the features "
                                "of every step averaged over time before the linear head, so every step's dynamics are "
                                "judged; meanstd: their mean and standard deviation over time, so a wandering level is "
                                "seen too")
    corrected.add_argument("--generator-noise", choices=["step", "mixed", "smooth"], default="step",
                           help="step: z ~ N(0, 1) drawn anew at every time step (the paper); mixed: the first half of "
                                "the -gid channels drawn once per sequence and held over time, a per-sequence latent; "
                                "smooth: as mixed, with the other half an AR(1) process of time constant "
                                "--noise-time-steps")
    corrected.add_argument("--noise-time-steps", type=_number_in(0.0, MAX_NOISE_TIME_STEPS, low_open=True),
                           default=30.0,
                           help="--generator-noise smooth: the AR(1) noise's time constant in steps (30 = 3 s at 10 "
                                "Hz, where the real traces' mean ACF falls to 1/e; longer gives the output longer "
                                "memory)")
    ext.add_argument("--condition", choices=["none", "temperature"], default="none",
                     help="none: unconditional, as the paper; temperature: the ambient temperature class of each "
                          "window (0, 10, 25 degC, from the data sidecar) is given to the generator with the noise and "
                          "to the critic with the sequence, as one-hot channels (conditional WGAN-GP)")
    ext.add_argument("--temperature-damping", type=_fraction, default=1.0,
                     help="the generated temperature is each sequence's mean temperature plus this fraction of the "
                          "generator's deviation from it: a cell's temperature hardly moves within a minute (real "
                          "windows: range 0.1-0.2 degC), a free channel wanders by degrees and blurs the temperature "
                          "classes; e.g. 0.02; 0: constant; 1: a free channel (the paper)")
    ext.add_argument("--temperature-bound", type=_number_in(0.0, MAX_TEMPERATURE_BOUND), default=0.0,
                     metavar="DEGC",
                     help="--condition temperature: hold each sequence's mean temperature within DEGC of its class's "
                          "real mean temperature (softly, by tanh: the identity near it; its gradient passes as the "
                          "identity's, so a sequence held at the bound is still pulled in); real windows lie within "
                          "-1.0 to +3.3 degC of theirs, the classes 9.5-14.5 degC apart, so 4 keeps every class "
                          "apart; 0: off (the paper)")
    corrected.add_argument("--gp-norm", choices=["paper", "sample"], default="paper",
                           help="paper: gradient norm over time per (sample, feature) as the original; "
                                "sample: per-sample norm over all time steps and features (Gulrajani et al.)")
    ext.add_argument("--mode-seeking", type=_weight, default=0.0,
                     help="weight of the mode-seeking term in the generator's loss (Mao et al. 2019): the generator "
                          "step draws its batch as pairs (one class each when conditional) and adds LAMBDA / (|G(z1) - "
                          "G(z2)| / |z1 - z2|), against one sequence per class (an odd batch leaves one sample out of "
                          "that step); 0: off (the paper)")
    ext.add_argument("--mode-seeking-on", choices=["all", "voltage"], default="all",
                     help="what --mode-seeking compares two samples on: all: V, I and T (Mao et al.); voltage: the "
                          "voltage only, so that the cheap ways to differ (a current offset, a temperature wobble) "
                          "earn nothing and the samples spread in voltage, i.e. in SOC")
    ext.add_argument("--level-mmd", type=_weight, default=0.0,
                     help="weight of a level-matching term in the generator's loss: the squared MMD, per class, "
                          "between the generated and the real windows' levels (mean V, I and T; the resistance the "
                          "voltage follows the current with and the spread of the voltage that this does not explain): "
                          "it asks for the real spread of levels where --mode-seeking rewards any spread; 0: off (the "
                          "paper)")
    ext.add_argument("--level-kernel", choices=["gaussian", "energy", "hybrid"], default="gaussian",
                     help="the kernel of --level-mmd: gaussian: Gaussian kernels at 0.25-2x the real windows' median "
                          "distance (their pull on a window several spreads off vanishes); energy: the energy distance "
                          "(kernel -|x - y|), whose pull does not vanish however far off a window is; hybrid: the "
                          "Gaussians on the mean levels, the energy distance (x 0.3) on the others")
    ext.add_argument("--level-steps", action="store_true",
                     help="--level-mmd also matches each window's V and I step differences (the log of their standard "
                          "deviation and its ratio to their mean absolute value): sparse jumps as in a drive cycle, "
                          "not a jitter")
    ext.add_argument("--level-temperature", action="store_true",
                     help="--level-mmd also matches each class's window mean temperatures on the class's own scale "
                          "(its real spread, 0.4-0.7 degC against 9.9 degC over all classes) by the energy distance: "
                          "on the common scale a class 2-4 degC off is hardly pulled back")
    ext.add_argument("--generator-ema", type=_unit_interval, default=0.0,
                     help="keep a running average of the generator's weights, ema = BETA * ema + (1 - BETA) * weights "
                          "after each generator step (one per epoch), and save and evaluate it in the snapshots "
                          "(<epoch>_epoch/generator.pth; the checkpoint keeps both): a GAN's levels swing from one "
                          "snapshot to the next, their average does not; e.g. 0.98; 0: off (the paper)")
    ext.add_argument("--critic-residual", type=_weight, default=0.0,
                     help="the critic also reads each sequence's voltage residual about its least-squares line in the "
                          "current (what the cell's resistance does not explain; real windows: 11-18 mV), times this "
                          "scale, as one more input channel, so that a voltage that wanders apart from the current is "
                          "seen; 0: off (the paper)")
    ext.add_argument("--generator-head", choices=["none", "physics"], default="none",
                     help="none: the generator's last LSTM gives V, I, T (the paper); physics: it gives a power demand "
                          "(held a second at a time, as the drive cycles' 1 Hz tables), the temperature, the SOC and "
                          "current a window starts from and a small voltage residual, and V, I, T follow through the "
                          "tester, a cell model fitted to the training cycles (--cell-model) and the sensors' grain "
                          "(cell_model.py): the voltage follows the current as the cell's does, the SOC the charge")
    ext.add_argument("--cell-model", default="./data/lg_cell_model.json", metavar="JSON",
                     help="--generator-head physics: the fitted cell model (python cell_model.py builds it); its "
                          "parameters are recorded in config.json, so a run keeps its own")
    run.add_argument("--pca-segment", choices=["aligned", "paper"], default="aligned",
                     help="aligned: compare real and synthetic over the same time steps; paper: real steps "
                          "0..L-1 against synthetic steps T-L-1..T-2 as the original did")
    run.add_argument("--soc-backend", choices=["torch", "keras"], default="torch",
                     help="torch: exact port of the Keras SOC model (no TensorFlow needed); keras: Keras predict")
    run.add_argument("--eval-metrics", choices=["quick", "all"], default="quick",
                     help="metrics written to <N>_epoch/metrics.json at every -s epoch: quick (distribution distances, "
                          "physics checks) or all (adds discriminative, predictive and TSTR scores; slower)")
    run.add_argument("--soc-labels", choices=["estimator", "fused"], default="estimator",
                     help="the SOC labels of the snapshots' fake_data.npy (over the same steps either way): "
                          "estimator: the estimator's reading of the window ending at each step (the paper); fused: "
                          "the level of 4 estimator readings plus the charge counted from the current "
                          "(soc_estimator.fused_labels; 75x cheaper, needs the data sidecar's capacity_ah), each "
                          "sequence's spread in soc_spread.npy")
    run.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                     help="fp32: the faithful numerics (TF32 off, also in cuDNN); tf32: TF32 matmuls and cuDNN on "
                          "Ampere+ GPUs; bf16: bfloat16 autocast of the networks (losses and optimizer stay fp32)")
    run.add_argument("--critic-chunk", type=_non_negative_int, default=None,
                     help="run each critic step on chunks of this many samples (0: the whole batch; default: the "
                          "largest chunk whose estimated peak fits in half the free memory); exact up to rounding, "
                          "bounds the step's peak memory (e.g. -b 512 on one GPU)")
    run.add_argument("--execute-notebook", action="store_true",
                     help="execute result.ipynb headless at the end of training and write result.html")
    return p


def parse_arg(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset = read_preset(args.preset)
    except UserError as err:
        parser.error(str(err))
    flags = {a.dest for a in parser._actions} - {"help", "preset"}
    unknown = sorted(set(preset) - flags)
    if unknown:
        parser.error(f"{PRESET_DIR / args.preset}.json: not flags of train_lstm_gan.py: {', '.join(unknown)}; "
                     f"name each flag by its dest, e.g. model_scale for --model-scale")
    if preset:   # the preset's values become the defaults: typed flags still win
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    return args


# ----------------------------------------------------------------------------------------------------------------
# the files the flags name

def resolve_soc_model(args: argparse.Namespace) -> Path:
    """-socmp/-socm, or the model shipped in soc_models/ when the authors' default file is absent."""
    default_dir = build_parser().get_default("soc_estimator_model_path")
    path = project_default(str(Path(args.soc_estimator_model_path) / args.soc_estimator_model),
                           str(Path(default_dir) / PAPER_SOC_MODEL))
    if path.is_file():
        return path
    if args.soc_estimator_model == PAPER_SOC_MODEL and args.soc_estimator_model_path == default_dir:
        if not SHIPPED_SOC_MODEL.is_file():
            raise UserError(f"{SHIPPED_SOC_MODEL}: the shipped SOC model is missing; restore it with git or "
                            f"pass -socmp/-socm")
        print(f"notice: {path} (the authors' SOC model) is absent; using {SHIPPED_SOC_MODEL}")
        return SHIPPED_SOC_MODEL
    raise UserError(f"{path}: SOC estimator model not found; check -socmp/-socm")


def resolve_notebook(args: argparse.Namespace) -> Path:
    """-n: the result notebook copied into the run folder (the project's own when started from elsewhere)."""
    notebook = project_default(args.result_notebook, build_parser().get_default("result_notebook"))
    if not notebook.is_file():
        raise UserError(f"{args.result_notebook}: result notebook not found; pass an existing notebook with -n")
    return notebook


def merge_saved_args(saved: dict, argv: list[str] | None = None) -> argparse.Namespace:
    """A run's saved flags with the flags in argv applied (typed as on a fresh start); flags that did not exist
    when the run was saved get their defaults (argparse sets a default only where the namespace lacks it)."""
    return build_parser().parse_args(argv, namespace=argparse.Namespace(**saved))
