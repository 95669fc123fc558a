"""The loop that trains a GAN of this project: GANTrainerBase opens or resumes a run (run_dir.RunDir), trains its
epochs with wgan_gp.WGANGP, writes losses, snapshots and checkpoints, and stops cleanly at a signal; a subclass
supplies the networks and their optimizers. Beside it: what a run starts from (resume, --init-from,
classes) and what it records (config.json, the snapshot's evaluation, the checks before the first epoch)."""
import argparse
import json
import platform
import signal
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import metrics
from arg_parser import ARCH_FLAGS, build_parser, merge_saved_args, resolve_notebook, resolve_soc_model
from cell_model import for_run as physics_for_run
from common import UserError, project_default, resolve_device, sha256
from extensions import TermSettings, generator_terms
from lg_dataset import LGDataset, data_classes, load_sidecar
from run_dir import RunDir, read_network
from runtime import (all_rng_states, any_rank, init_distributed, pick_critic_chunk, rng_state, seed_everything,
                     set_rng_state, shared_seed, unwrap)
from sampling import check_labels, labelled_sequences, labels_record, real_steps
from soc_estimator import SOCEstimator
from wgan_gp import WGANGP, WGANGPSettings

PROJECT_DIR = Path(__file__).resolve().parent
REAL_SAMPLE_SAVED = 64   # real windows kept per epoch folder for the notebook's real-vs-synthetic plots
MIN_EVAL_SAMPLES = 4     # -ess below this: too few sequences for PCA, t-SNE and the unbiased MMD
DRY_RUN_SAMPLES = 8      # sequences of the evaluation's trial run before training


# ----------------------------------------------------------------------------------------------------------------
# what a run starts from

def load_snapshot(gan: "WGANGP", folder: Path) -> None:
    """--init-from: a snapshot's networks into a new run's generator (and its running average) and critic."""
    for name, nets in (("generator.pth", [unwrap(gan.G), gan.G_ema]), ("discriminator.pth", [unwrap(gan.D)])):
        path = folder / name
        try:
            state = read_network(path)
            for net in nets:
                if net is not None:
                    net.load_state_dict(state)
        except Exception as err:   # missing, damaged, not weights, or other shapes
            raise UserError(f"{path}: cannot start from this snapshot ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:120]}); pass a <run>/<N>_epoch folder of a run with the "
                            f"same architecture flags") from None


def resume_args(run: RunDir, argv: list[str] | None, world: int) -> tuple[argparse.Namespace, dict]:
    """(the run's own flags with the flags typed now applied, its checkpoint): flags typed now (e.g. -e to train
    longer) override the saved ones, except those that would change the networks; flags added since the
    checkpoint was written get their defaults."""
    checkpoint = run.read_checkpoint()
    run.read_config(), run.read_losses()   # both intact, or one line now rather than a crash at the end
    saved = checkpoint["args"]
    args = merge_saved_args(saved, argv)
    # a flag newer than the run: the run was built with what is now its default
    parser = build_parser()
    built = {k: saved.get(k, parser.get_default(k)) for k in ARCH_FLAGS}
    changed = [k for k in ARCH_FLAGS if getattr(args, k) != built[k]]
    if changed:
        flags = ", ".join(f"{k}={getattr(args, k)} (run: {built[k]})" for k in changed)
        raise UserError(f"{run.path}: incompatible architecture flags for resume: {flags}; "
                        f"drop them or start a new run")
    if len(checkpoint["rng"]) != world:
        raise UserError(f"{run.path}: the run was trained by {len(checkpoint['rng'])} process(es), not {world}; "
                        f"resume it with the same number (its random streams are per process)")
    return args, checkpoint


def condition_classes(condition: str, data_path: Path, n: int) -> tuple[torch.Tensor | None, list[str]]:
    """--condition temperature: each window's ambient temperature class, from the data sidecar's file_index
    (which windows come from which file) -> (int64 [n], class names); (None, []) when unconditional."""
    if condition == "none":
        return None, []
    classes, names = data_classes(data_path, n)
    return torch.from_numpy(classes), names


def temperature_anchor(real: np.ndarray, classes: torch.Tensor | None, n_classes: int, scaler: dict | None,
                       args: argparse.Namespace, data_path: Path) -> tuple[list[float], float] | None:
    """--temperature-bound: (each class's real mean temperature, the bound), in the data's scaled units."""
    if not args.temperature_bound:
        return None
    if classes is None or scaler is None:
        raise UserError(f"--temperature-bound {args.temperature_bound}: bounds each temperature class; needs "
                        f"--condition temperature and {data_path}'s sidecar scaler")
    unit = scaler["max"][2] - scaler["min"][2]   # degC per scaled unit
    centres = [float(real[classes.numpy() == k, :, 2].mean()) for k in range(n_classes)]
    return centres, args.temperature_bound / unit


# ----------------------------------------------------------------------------------------------------------------
# the loop

class GANTrainerBase(ABC):
    """Everything a run needs is read and checked in __init__, before anything is written; train() then writes the
    run folder (rank 0 alone under torchrun) and trains from self.start_epoch to -e."""
    trainer_name = "gan"

    @abstractmethod
    def build_models(self) -> tuple[nn.Module, nn.Module]:
        """Return (generator, critic) on the CPU."""

    @abstractmethod
    def build_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Return (generator optimizer, critic optimizer) over self.G and self.D."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None):
        self.rank, local_rank, self.world = init_distributed(args.device)
        self.run, self.checkpoint, self.stopped_by = None, None, None
        if args.resume_model_name is not None and args.init_from is not None:
            raise UserError(f"--init-from {args.init_from}: starts a new run, -r {args.resume_model_name} continues "
                            f"one; drop one of them")
        if args.resume_model_name is not None:
            self.run = RunDir.open(args.results_dir, args.resume_model_name)
            if self.rank == 0:   # one writer per run folder, from the first read to the end
                self.run.lock()
        try:
            self.args, self.checkpoint = resume_args(self.run, argv, self.world) if self.run else (args, None)
            self._set_device(local_rank)
            self._load_data()
            self.soc_model_path = resolve_soc_model(self.args)
            self.soc = SOCEstimator.load(self.soc_model_path, self.device, backend=self.args.soc_backend)
            self.notebook = resolve_notebook(self.args)
            self._build_gan()
            check_inputs(self)
        except BaseException:
            if self.run is not None:
                self.run.unlock()
            raise

    def _set_device(self, local_rank: int) -> None:
        a = self.args
        if self.world > 1:   # each process drives one device; its share of the batch is -b / world
            if a.batch_size % self.world:
                raise UserError(f"-b {a.batch_size}: the batch must split evenly over {self.world} processes")
            cuda = torch.cuda.is_available() and a.device != "cpu"
            self.device, self.device_ids = torch.device("cuda", local_rank) if cuda else torch.device("cpu"), []
        else:
            self.device, self.device_ids = resolve_device(a.device, a.gpus)
        self.batch_size = a.batch_size // self.world
        self.seed = shared_seed(a.seed, self.world)

    def _load_data(self) -> None:
        a = self.args
        self.data_path = project_default(a.data_path, build_parser().get_default("data_path"))
        dataset = LGDataset(self.data_path)
        self.real_data = dataset.data.numpy()                       # [n, T, 4]: V, I, T, SOC (scaled)
        self.n_features, self.seq_len = 3, dataset.seq_len          # the GAN generates V, I, T
        self.scaler = (load_sidecar(self.data_path) or {}).get("scaler")   # None: metrics skip physical units
        self.train_data = dataset.data[:, :, :self.n_features].contiguous().to(self.device)
        n = len(dataset)
        self.classes, self.class_names = condition_classes(a.condition, self.data_path, n)
        self.temperature_anchor = temperature_anchor(self.real_data, self.classes, len(self.class_names), self.scaler,
                                                     a, self.data_path)
        self.physics = physics_for_run(a, self.scaler, self.run and self.run.read_config(), self.run and self.run.path,
                                       self.real_data, self.classes, len(self.class_names))
        if self.batch_size > n:
            raise UserError(f"{self.data_path}: batch size {self.batch_size} is larger than the dataset "
                            f"({n} windows); use -b {n * self.world} or less")
        if self.seq_len <= a.soc_estimator_step:
            raise UserError(f"{self.data_path}: sequences of {self.seq_len} steps are not longer than the SOC "
                            f"estimator window (-socs {a.soc_estimator_step}); use a shorter -socs")

    def _build_gan(self) -> None:
        seed_everything(self.seed)   # same seed on every rank: identical initial networks
        generator, critic = self.build_models()
        self.G, self.D = generator.to(self.device), critic.to(self.device)
        if len(self.device_ids) > 1:
            self.G = nn.DataParallel(self.G, device_ids=self.device_ids)
            self.D = nn.DataParallel(self.D, device_ids=self.device_ids)
        g_optim, d_optim = self.build_optimizers()
        if self.args.critic_chunk is None:   # said once; config.json records it
            self.args.critic_chunk, said = pick_critic_chunk(self.D, self.batch_size, self.seq_len, self.device,
                                                             max(1, len(self.device_ids)))
            if self.rank == 0:
                print(said, flush=True)
        if self.world > 1:   # ... but each rank its own noise and its own batches
            seed_everything(self.seed + self.rank)
        terms = generator_terms(TermSettings.from_args(self.args), self.train_data, self.classes)
        self.gan = WGANGP(self.G, self.D, g_optim, d_optim, self.train_data, self.batch_size, self.seed + self.rank,
                          WGANGPSettings.from_args(self.args), self.world, self.classes, terms)
        self.start_epoch = 0
        self.best = {"g_loss": float("inf"), "g_epoch": 0, "d_loss": float("inf"), "d_epoch": 0}
        if self.checkpoint is not None:
            self.gan.load_state_dict(self.checkpoint)
            self.start_epoch, self.best = self.checkpoint["epoch"], self.checkpoint["best"]
            set_rng_state(self.checkpoint["rng"][self.rank], self.device, self.gan.sampler)
        elif self.args.init_from is not None:
            load_snapshot(self.gan, Path(self.args.init_from))

    # ---- the run folder ---------------------------------------------------------------------------------------

    def _open_run(self) -> None:
        if self.checkpoint is None:
            self.args.seed = self.seed
            self.run = RunDir.create(self.args.results_dir, self.trainer_name)
            self.run.lock()
            self.run.write_config(run_config(self))
            self.run.save_copy(self.notebook, "result.ipynb")
            self.run.start_losses()
        else:
            self.run.truncate_losses(self.start_epoch)
            self.run.record_resume(self.start_epoch, vars(self.args))

    def save_checkpoint(self, epoch: int) -> None:
        """Every rank's random streams go in (one list entry per rank); only rank 0 writes."""
        rng = all_rng_states(self.device, self.gan.sampler, self.world)
        if self.rank == 0:
            self.run.write_checkpoint({**self.gan.state_dict(), "epoch": epoch, "best": self.best,
                                       "args": vars(self.args), "rng": rng})

    def _record(self, epoch: int, losses: dict[str, float]) -> None:
        self.run.append_losses(epoch, losses)
        for net, key, name in ((self.G, "g", "best_generator"), (self.D, "d", "best_discriminator")):
            if losses[f"{key}_loss"] < self.best[f"{key}_loss"]:
                self.best[f"{key}_loss"], self.best[f"{key}_epoch"] = losses[f"{key}_loss"], epoch
                self.run.write_best(name, unwrap(net).state_dict(), losses[f"{key}_loss"], epoch)

    # ---- evaluation -------------------------------------------------------------------------------------------

    def snapshot(self, epoch: int) -> None:
        """<epoch>_epoch/: the networks and the evaluation's arrays and metrics.json, complete or absent."""
        def fill(folder: Path) -> None:
            torch.save(self.gan.sampled_generator.state_dict(), folder / "generator.pth")
            torch.save(unwrap(self.D).state_dict(), folder / "discriminator.pth")
            arrays, quality = evaluation(self, epoch, self.args.evaluate_sample_size)
            for name, array in arrays.items():   # with fused labels also soc_spread.npy, each sequence's spread
                np.save(folder / f"{name}.npy", array)
            # which SOC labels fake_data.npy, the sample metrics.json scores, carries (metrics.json: numbers only)
            labels = labels_record(self.args.soc_labels, self.seq_len, self.args.soc_estimator_step)
            (folder / "fake_data.npy.json").write_text(json.dumps(labels | {"steps_kept": "paper"}, indent=2))
            (folder / "metrics.json").write_text(json.dumps(quality, indent=2))
        self.run.commit_epoch(epoch, fill)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def train(self) -> Path | None:
        """Train from self.start_epoch to -e; rank 0 alone writes the results folder and prints."""
        lead = self.rank == 0
        if lead:
            self._open_run()
            print(f"{'Resuming' if self.checkpoint else 'Start training'}: {self.run.path} on {self.device} "
                  f"x{self.world} (seed {self.seed}, data {tuple(self.real_data.shape)}, "
                  f"from epoch {self.start_epoch + 1})", flush=True)

        def request_stop(signum, _frame):   # finish the epoch, checkpoint, exit; a second signal kills
            self.stopped_by = signum
            signal.signal(signum, signal.SIG_DFL)
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            epoch = self._train_epochs()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.run is not None:
                self.run.unlock()
        if self.world > 1:
            dist.destroy_process_group()
        if not lead:
            return None
        if self.stopped_by is not None:
            print(f"Stopped after epoch {epoch}; resume with: python train_lstm_gan.py -r {self.run.name}")
        elif self.args.execute_notebook:
            from run_notebook import execute_notebook
            print(f"Result notebook: {execute_notebook(self.run.path)}")
        return self.run.path

    def _train_epochs(self) -> int:
        """The epoch loop: train, record, snapshot and checkpoint every -s epochs, and stop at a signal after
        checkpointing the epoch. -> the last epoch trained."""
        a, lead = self.args, self.rank == 0
        bar = tqdm(total=a.gan_epochs, initial=self.start_epoch, desc="epochs") if a.show_progress_bar and lead \
            else None
        begin, epoch = time.time(), self.start_epoch
        try:
            for epoch in range(self.start_epoch + 1, a.gan_epochs + 1):
                losses = self.gan.train_epoch()
                if lead:
                    self._record(epoch, losses)
                    report(self, epoch, losses, time.time() - begin, bar)
                if epoch % a.save_epoch_interval == 0:
                    if lead:
                        self.snapshot(epoch)
                    self.save_checkpoint(epoch)
                if any_rank(self.stopped_by is not None, self.device, self.world):
                    break
            if epoch % a.save_epoch_interval != 0:
                self.save_checkpoint(epoch)
        finally:
            if bar is not None:
                bar.close()
        return epoch


# ----------------------------------------------------------------------------------------------------------------
# what a run reports and records

def report(trainer: GANTrainerBase, epoch: int, losses: dict[str, float], seconds: float, bar: tqdm | None) -> None:
    """The epoch's losses on the bar or every -t epochs; after the first epoch, what the whole run will take here,
    before the user waits days for it."""
    t, a = trainer, trainer.args
    if epoch == t.start_epoch + 1:
        total = seconds * (a.gan_epochs - t.start_epoch)
        when = f"{total / 86400:.1f} days" if total >= 86400 else f"{total / 3600:.1f} h"
        print(f"first epoch: {seconds:.1f} s of training; {a.gan_epochs - t.start_epoch} epochs at this pace: "
              f"{when} (snapshots every -s {a.save_epoch_interval} epochs come on top)", flush=True)
        if total >= 86400 and t.device.type == "cpu":
            print("note: this is the paper's GPU configuration; on a CPU, --preset cpu trains a smaller network "
                  "sized for it (see README)", flush=True)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(g_loss=f"{losses['g_loss']:.4f}", d_loss=f"{losses['d_loss']:.4f}")
    elif epoch % a.train_report_interval == 0:
        print(f"[Epoch:{epoch}/{a.gan_epochs}] Time passed:{seconds:.0f}s, "
              f"g_loss:{losses['g_loss']:.6f}, d_loss:{losses['d_loss']:.6f}", flush=True)


def run_config(trainer: GANTrainerBase) -> dict:
    """config.json of a new run: its flags, where it ran, its data (path and SHA-256) and SOC model."""
    t = trainer
    return {
        "args": vars(t.args), "result_name": t.run.name, "command": sys.argv,
        "device": str(t.device), "device_ids": t.device_ids, "world_size": t.world, "seed": t.seed,
        "seq_len": t.seq_len, "n_windows": len(t.train_data), "condition_classes": t.class_names,
        "condition_shares": [] if t.classes is None else (np.bincount(t.classes.numpy()) / len(t.classes)).tolist(),
        "data_path": str(t.data_path), "data_sha256": sha256(t.data_path), "scaler": t.scaler,
        "soc_model": str(t.soc_model_path), "soc_backend": t.args.soc_backend,
        "temperature_anchor": t.temperature_anchor, "cell_model": t.physics[0] if t.physics else None,
        "init_from_sha256": None if t.args.init_from is None else {
            name: sha256(Path(t.args.init_from) / name) for name in ("generator.pth", "discriminator.pth")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "sklearn": sklearn.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def evaluation(trainer: GANTrainerBase, epoch: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """An epoch's evaluation: n labelled synthetic sequences, a real sample, PCA, t-SNE and the quality metrics
    (those of evaluate.py). Its randomness is separate from training's: the same epoch gives the same files."""
    t, a = trainer, trainer.args
    eval_seed = (t.seed * 1_000_003 + epoch) % 2 ** 63
    idx = np.random.default_rng(eval_seed).integers(len(t.real_data), size=n)   # with replacement, as the original
    classes = None if t.classes is None else t.classes.numpy()[idx]   # conditional: the real sample's classes
    generator = t.gan.sampled_generator
    training = generator.training
    generator.eval()
    try:
        fake, _, spread = labelled_sequences(generator, t.soc, n, eval_seed, a.soc_estimator_step, a.batch_size,
                                             t.device, classes=classes, labels=a.soc_labels, scaler=t.scaler)
    finally:
        generator.train(training)

    def real(rows: np.ndarray, segment: str = "aligned") -> np.ndarray:
        return real_steps(t.real_data[rows], t.seq_len, a.soc_estimator_step, segment)
    arrays = {"fake_data": fake, "real_data": real(idx[:REAL_SAMPLE_SAVED])} | ({} if spread is None else
                                                                               {"soc_spread": spread})
    nonfinite = float(1 - np.isfinite(fake).mean())
    if nonfinite > 0:   # a diverged generator: recorded (no embedding or metric of NaNs), training goes on
        return arrays, {"nonfinite_share": nonfinite}
    arrays.update(metrics.pca_tsne(real(idx, a.pca_segment), fake, seed=eval_seed % 2 ** 32))
    # distinct windows for the metrics: one window on both sides of a post-hoc split would flatter the scores
    distinct, seed = real(np.unique(idx)), eval_seed % 2 ** 32
    if a.eval_metrics == "quick":
        return arrays, metrics.quick_metrics(distinct, fake, t.scaler, seed) | per_class_metrics(t, idx, fake, seed,
                                                                                                  distinct)
    # --eval-metrics all: TSTR on the shipped real test cycles when their window matches -socs
    test_path = PROJECT_DIR / "data" / "lg_test_300_data.npy"
    test = np.load(test_path) if test_path.is_file() else None
    if test is not None and test.shape[1] != distinct.shape[1]:
        test = None
    return arrays, metrics.all_metrics(distinct, fake, t.scaler, seed, t.device, test_windows=test,
                                       train_windows=t.real_data)


def per_class_metrics(trainer: GANTrainerBase, idx: np.ndarray, fake: np.ndarray, seed: int,
                      distinct: np.ndarray) -> dict[str, float]:
    """Conditional runs: every quick metric of each class's synthetic sequences (drawn for the windows idx) against
    the distinct real windows of that class (distinct: windows np.unique(idx), their compared steps)."""
    t = trainer
    if t.classes is None:
        return {}
    classes = t.classes.numpy()
    return metrics.per_class(distinct, classes[np.unique(idx)], fake, classes[idx], t.class_names, t.scaler, seed,
                             min_fake=MIN_EVAL_SAMPLES)


def check_inputs(trainer: GANTrainerBase) -> None:
    """What would otherwise fail only at the first -s snapshot, hours in: checked now, then the evaluation runs
    once on a few sequences (its files are not written) so that whatever remains fails in seconds."""
    t, a = trainer, trainer.args
    if t.soc.n_features != t.n_features:
        raise UserError(f"{t.soc_model_path}: the SOC model takes {t.soc.n_features} inputs, the GAN labels V, I, "
                        f"T ({t.n_features}); pass a model trained on V, I, T with -socmp/-socm")
    if min(a.soc_estimator_step, t.seq_len - a.soc_estimator_step) < 2:
        raise UserError(f"-socs {a.soc_estimator_step}: the evaluation keeps L = min(socs, T - socs) steps of each "
                        f"{t.seq_len}-step sequence, here fewer than 2; use -socs {t.seq_len - 2} or less")
    if a.mode_seeking and t.batch_size < 2:
        raise UserError(f"--mode-seeking {a.mode_seeking}: the generator step compares pairs of samples, and each "
                        f"process has a batch of {t.batch_size}; use -b {2 * t.world} or more, or --mode-seeking 0")
    check_labels(a.soc_labels, t.scaler, t.data_path.with_suffix(".json"))   # fused labels: capacity_ah
    if a.evaluate_sample_size < MIN_EVAL_SAMPLES:
        raise UserError(f"-ess {a.evaluate_sample_size}: the evaluation (PCA, t-SNE, metrics) needs at least "
                        f"{MIN_EVAL_SAMPLES} sequences; use -ess {MIN_EVAL_SAMPLES} or more")
    if t.checkpoint is not None and sha256(t.data_path) != t.run.read_config().get("data_sha256"):
        raise UserError(f"{t.data_path}: not the data this run was trained on (its SHA-256 differs from "
                        f"config.json's data_sha256); resume with the run's own data (drop -d) or start a new run")
    saved = rng_state(t.device, t.gan.sampler)   # the dry run must not move training's random streams
    try:
        evaluation(t, 0, min(a.evaluate_sample_size, DRY_RUN_SAMPLES))
    except UserError:
        raise
    except Exception as err:   # whatever the checks above missed, as one line instead of a late traceback
        raise UserError(f"the evaluation failed on a trial sample before training ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); check -ess, -socs, --eval-metrics and the SOC "
                        f"model") from None
    finally:
        set_rng_state(saved, t.device, t.gan.sampler)
