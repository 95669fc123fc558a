"""The shared WGAN-GP loop: data, critic and generator steps, gradient penalty, evaluation snapshots,
checkpoint/resume and the results folder. A subclass supplies the networks and their optimizers."""
import argparse
import csv
import hashlib
import json
import os
import platform
import random
import shutil
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
from arg_parser import PAPER_SOC_MODEL, build_parser
from lean_lstm import unrolled
from lg_dataset import DataError, LGDataset, load_sidecar

PROJECT_DIR = Path(__file__).resolve().parent
SHIPPED_SOC_MODEL = PROJECT_DIR / "soc_models" / "lg_positive_temp_300_steps.h5"
LOSS_COLUMNS = ("g_loss", "d_loss", "d_real", "d_fake", "gp")
# flags that change the shapes or the meaning of the saved networks: a resumed run must keep them
ARCH_FLAGS = ("generator_input_dim", "model_scale", "norm_layout")
REAL_SAMPLE_SAVED = 64   # real windows kept per epoch folder for the notebook's real-vs-synthetic plots


class UserError(ValueError):
    """Bad input: printed as one line (file, problem, fix), exit code 2, nothing written."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers

def project_default(path: str, default: str) -> Path:
    """Defaults are relative to the project, so the command also works when started from another folder."""
    p = Path(path)
    if path == default and not p.exists() and (PROJECT_DIR / default).exists():
        return PROJECT_DIR / default
    return p


def resolve_device(name: str, gpus: list[int] | None) -> tuple[torch.device, list[int]]:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        if gpus:
            raise UserError(f"--gpus {gpus}: GPU ids given but the device is cpu; drop --gpus or use --device cuda")
        return device, []
    if device.type != "cuda":
        raise UserError(f"--device {name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    ids = gpus if gpus else ([device.index] if device.index is not None else list(range(count)))
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserError(f"--gpus: GPU id(s) {bad} do not exist; this machine has {count} GPU(s) (ids 0..{count - 1})")
    return torch.device("cuda", ids[0]), ids


def bf16_lstm_supported(device: torch.device) -> bool:
    """CPU bf16 autocast of an LSTM needs oneDNN's bf16 kernels, which many CPUs lack (it then raises)."""
    if device.type != "cpu":
        return True
    try:
        with torch.autocast("cpu", torch.bfloat16):
            torch.nn.LSTM(3, 4, batch_first=True)(torch.randn(1, 2, 3))
        return True
    except RuntimeError:
        return False


# Peak bytes of one critic-step chunk per sample x step x critic hidden unit (sum over its LSTMs), the penalty's
# double backward on the lean path being the larger pass: 147-170 measured on the CPU (RSS), 200 for margin.
CRITIC_BYTES_PER_UNIT = 200


def free_memory(device: torch.device) -> int:
    """Bytes the step may use: free GPU memory, or MemAvailable of the machine (Linux) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30   # not Linux: assume a laptop's 8 GB


def auto_critic_chunk(batch: int, seq_len: int, critic_units: int, budget: int) -> int:
    """The largest chunk whose estimated peak fits in budget bytes (0: the whole batch fits)."""
    per_sample = CRITIC_BYTES_PER_UNIT * seq_len * critic_units
    chunk = max(2, budget // per_sample)
    return 0 if chunk >= batch else int(chunk)


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU. -> (rank, local, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, local, world


def average_gradients(model: nn.Module, world: int) -> None:
    """Data parallelism across processes: every rank steps with the mean of all ranks' gradients. Done by hand
    rather than with DistributedDataParallel, whose reducer does not support the penalty's double backward."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """State dicts are saved without DataParallel's 'module.' prefix so a checkpoint does not depend on GPU count."""
    return getattr(model, "module", model)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted write never destroys the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def explicit_flags(argv: list[str] | None) -> dict:
    """The flags the user typed (not their defaults): used to override a resumed run's saved flags."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, lambda_term: float,
                     norm: str = "paper", eta: torch.Tensor | None = None) -> torch.Tensor:
    """lambda * E[(||grad critic(x_hat)|| - 1)^2] at random interpolates x_hat of real and fake [B, T, F].
    norm 'paper' takes the 2-norm over time per (sample, feature), as the original's norm(2, dim=1);
    'sample' takes it over all of a sample's steps and features, as Gulrajani et al.
    eta [B, 1, 1]: the interpolation weights, drawn here when not given."""
    if eta is None:   # sized from the actual batch (the original crashed on a short last batch)
        eta = torch.rand(len(real), 1, 1, device=real.device)
    interpolated = (eta * real + (1 - eta) * fake).requires_grad_(True)
    score = critic(interpolated)
    grad, = torch.autograd.grad(score, interpolated, grad_outputs=torch.ones_like(score), create_graph=True)
    grad_norm = grad.norm(2, dim=1) if norm == "paper" else grad.flatten(1).norm(2, dim=1)
    return ((grad_norm - 1) ** 2).mean() * lambda_term


class BatchSampler:
    """One persistent shuffled pass after another over the real windows (the original rebuilt its loader
    iterator at every critic step). The last batch of a pass may be short, as with DataLoader(drop_last=False).
    Its state is part of the checkpoint, so a resumed run draws the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = None, 0

    def next_indices(self) -> torch.Tensor:
        if self.perm is None or self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], state["pos"]


# ----------------------------------------------------------------------------------------------------------------

class GANTrainerBase(ABC):
    trainer_name = "gan"

    @abstractmethod
    def build_models(self) -> tuple[nn.Module, nn.Module]:
        """Return (generator, critic) on the CPU."""

    @abstractmethod
    def build_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Return (generator optimizer, critic optimizer) over self.G and self.D."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None):
        # Everything is checked before anything is written: bad input leaves no trace.
        self.checkpoint, self.run_dir = None, None
        self.rank, local_rank, self.world = init_distributed(args.device)
        if args.resume_model_name is not None:
            args = self._resume_args(args, argv)
        self.args = args
        if self.world > 1:   # each process drives one device; its share of the batch is -b / world
            if args.batch_size % self.world:
                raise UserError(f"-b {args.batch_size}: the batch must split evenly over {self.world} processes")
            self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() and args.device != "cpu" \
                else torch.device("cpu")
            self.device_ids = []
        else:
            self.device, self.device_ids = resolve_device(args.device, args.gpus)
        if args.precision == "bf16" and not bf16_lstm_supported(self.device):
            raise UserError("--precision bf16: this CPU has no bfloat16 LSTM kernels (oneDNN); use --precision fp32 "
                            "(bf16 is meant for GPUs)")
        self.batch_size = args.batch_size // self.world
        self.seed = self._shared_seed(args.seed)

        # ---- data ----
        self.data_path = project_default(args.data_path, build_parser().get_default("data_path"))
        try:
            dataset = LGDataset(self.data_path)
        except DataError as err:
            raise UserError(str(err)) from None
        self.real_data = dataset.data.numpy()                       # [n, T, 4]: V, I, T, SOC (scaled)
        self.n_features = 3                                         # the GAN generates V, I, T
        self.seq_len = dataset.seq_len
        self.scaler = (load_sidecar(self.data_path) or {}).get("scaler")   # None: metrics skip physical units
        self.train_data = dataset.data[:, :, :self.n_features].contiguous().to(self.device)
        self._check_shapes(len(dataset))

        # ---- SOC estimator, notebook ----
        self.soc_model_path = self._resolve_soc_model()
        self.soc = self._load_soc_estimator()
        self.notebook = project_default(args.result_notebook, build_parser().get_default("result_notebook"))
        if not self.notebook.is_file():
            raise UserError(f"{args.result_notebook}: result notebook not found; pass an existing notebook with -n")

        # ---- model, optimizer ----
        self._seed_everything(self.seed)   # same seed on every rank: identical initial networks
        generator, critic = self.build_models()
        self.G, self.D = generator.to(self.device), critic.to(self.device)
        if len(self.device_ids) > 1:
            self.G = nn.DataParallel(self.G, device_ids=self.device_ids)
            self.D = nn.DataParallel(self.D, device_ids=self.device_ids)
        self.g_optim, self.d_optim = self.build_optimizers()
        if args.critic_chunk is None:
            self._pick_critic_chunk()
        if self.world > 1:   # ... but each rank its own noise and its own batches
            self._seed_everything(self.seed + self.rank)
        self.sampler = BatchSampler(len(self.train_data), self.batch_size, self.seed + self.rank)
        self.start_epoch = 0
        self.best = {"g_loss": float("inf"), "g_epoch": 0, "d_loss": float("inf"), "d_epoch": 0}
        self.history = {k: [] for k in LOSS_COLUMNS}
        if self.checkpoint is not None:
            self._restore(self.checkpoint)

    def _pick_critic_chunk(self) -> None:
        """--critic-chunk not given: the whole batch if its estimated peak fits in half the free memory, else the
        largest chunk that does (exact up to rounding either way). Said once, recorded in config.json."""
        units = sum(m.hidden_size for m in unwrap(self.D).modules() if isinstance(m, nn.LSTM))
        devices = max(1, len(self.device_ids))   # DataParallel splits each chunk over the GPUs
        budget = free_memory(self.device) * devices // 2
        chunk = auto_critic_chunk(self.batch_size, self.seq_len, units, budget)
        self.args.critic_chunk = chunk
        estimate = CRITIC_BYTES_PER_UNIT * self.seq_len * units * (chunk or self.batch_size) / devices
        if self.rank == 0:
            print(f"critic chunk: {chunk or 'whole batch'} of {self.batch_size} samples (estimated peak "
                  f"{estimate / 2**30:.1f} GiB of {budget * 2 / devices / 2**30:.1f} GiB free on {self.device}; "
                  f"set --critic-chunk to choose)", flush=True)

    def _shared_seed(self, seed: int | None) -> int:
        if seed is None:
            seed = random.SystemRandom().randrange(2 ** 31)
        if self.world > 1:   # a drawn seed must be the same on every rank
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        return seed

    # ---- input checks -------------------------------------------------------------------------------------

    def _check_shapes(self, n: int) -> None:
        a = self.args
        if self.batch_size > n:
            raise UserError(f"{self.data_path}: batch size {self.batch_size} is larger than the dataset "
                            f"({n} windows); use -b {n * self.world} or less")
        if self.seq_len <= a.soc_estimator_step:
            raise UserError(f"{self.data_path}: sequences of {self.seq_len} steps are not longer than the SOC "
                            f"estimator window (-socs {a.soc_estimator_step}); use a shorter -socs")

    def _resolve_soc_model(self) -> Path:
        a = self.args
        parser = build_parser()
        default_dir = parser.get_default("soc_estimator_model_path")
        path = project_default(str(Path(a.soc_estimator_model_path) / a.soc_estimator_model),
                               str(Path(default_dir) / PAPER_SOC_MODEL))
        if path.is_file():
            return path
        if a.soc_estimator_model == PAPER_SOC_MODEL and a.soc_estimator_model_path == default_dir:
            if not SHIPPED_SOC_MODEL.is_file():
                raise UserError(f"{SHIPPED_SOC_MODEL}: the shipped SOC model is missing; restore it with git or "
                                f"pass -socmp/-socm")
            print(f"notice: {path} (the authors' SOC model) is absent; using {SHIPPED_SOC_MODEL}")
            return SHIPPED_SOC_MODEL
        raise UserError(f"{path}: SOC estimator model not found; check -socmp/-socm")

    def _load_soc_estimator(self):
        from soc_estimator import SOCEstimator, SOCModelError
        try:
            return SOCEstimator.load(self.soc_model_path, self.device, backend=self.args.soc_backend)
        except SOCModelError as err:
            raise UserError(str(err)) from None

    # ---- resume ---------------------------------------------------------------------------------------------

    def _resume_args(self, args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
        """Resume with the run's own flags; flags typed now (e.g. -e to train longer) override them,
        except those that would change the networks."""
        run_dir = Path(args.results_dir) / args.resume_model_name
        ckpt_path = run_dir / "checkpoint.pt"
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run to resume; list {args.results_dir} for run names")
        if not ckpt_path.is_file():
            raise UserError(f"{ckpt_path}: the run has no checkpoint to resume from (it stopped before its first "
                            f"save); start a new run instead")
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as err:   # any unpickling failure means the file is unusable
            raise UserError(f"{ckpt_path}: unreadable checkpoint ({type(err).__name__}); "
                            f"start a new run instead") from None
        saved = dict(checkpoint["args"])
        typed = explicit_flags(argv if argv is not None else sys.argv[1:])
        changed = [k for k in ARCH_FLAGS if k in typed and typed[k] != saved[k]]
        if changed:
            flags = ", ".join(f"{k}={typed[k]} (run: {saved[k]})" for k in changed)
            raise UserError(f"{run_dir}: incompatible architecture flags for resume: {flags}; "
                            f"drop them or start a new run")
        saved.update(typed)
        self.checkpoint, self.run_dir = checkpoint, run_dir
        return argparse.Namespace(**saved)

    def _restore(self, ckpt: dict) -> None:
        unwrap(self.G).load_state_dict(ckpt["generator"])
        unwrap(self.D).load_state_dict(ckpt["discriminator"])
        self.g_optim.load_state_dict(ckpt["g_optim"])
        self.d_optim.load_state_dict(ckpt["d_optim"])
        self.start_epoch, self.best, self.history = ckpt["epoch"], ckpt["best"], ckpt["history"]
        if len(ckpt["rng"]) != self.world:
            raise UserError(f"{self.run_dir}: the run was trained by {len(ckpt['rng'])} process(es), not "
                            f"{self.world}; resume it with the same number (its random streams are per process)")
        rng = ckpt["rng"][self.rank]
        self.sampler.load_state_dict(rng["sampler"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _rng_state(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "sampler": self.sampler.state_dict()}

    def save_checkpoint(self, epoch: int) -> None:
        """Every rank's random streams go in (one list entry per rank); only rank 0 writes."""
        rng = [self._rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, self._rng_state())
        if self.rank == 0:
            atomic_save({
                "generator": unwrap(self.G).state_dict(), "discriminator": unwrap(self.D).state_dict(),
                "g_optim": self.g_optim.state_dict(), "d_optim": self.d_optim.state_dict(),
                "epoch": epoch, "best": self.best, "history": self.history, "args": vars(self.args), "rng": rng,
            }, self.run_dir / "checkpoint.pt")

    # ---- results folder ---------------------------------------------------------------------------------------

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _new_run_dir(self) -> Path:
        """results/<unix time>_<trainer>; mkdir is atomic, so two runs started in the same second still get
        different folders (the later one takes the next free second)."""
        base = Path(self.args.results_dir)
        base.mkdir(parents=True, exist_ok=True)
        stamp = int(time.time())
        while True:
            path = base / f"{stamp}_{self.trainer_name}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                stamp += 1

    def _config(self) -> dict:
        return {
            "args": vars(self.args), "result_name": self.run_dir.name, "command": sys.argv,
            "device": str(self.device), "device_ids": self.device_ids, "world_size": self.world, "seed": self.seed,
            "seq_len": self.seq_len, "n_windows": len(self.train_data),
            "data_path": str(self.data_path), "data_sha256": sha256(self.data_path),
            "scaler": self.scaler,
            "soc_model": str(self.soc_model_path), "soc_backend": self.args.soc_backend,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "sklearn": sklearn.__version__},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _open_run(self) -> None:
        if self.checkpoint is None:
            self.args.seed = self.seed
            self.run_dir = self._new_run_dir()
            atomic_json(self._config(), self.run_dir / "config.json")
            shutil.copyfile(self.notebook, self.run_dir / "result.ipynb")
            with open(self.run_dir / "losses.csv", "w", newline="") as f:
                csv.writer(f).writerow(("epoch",) + LOSS_COLUMNS)
        else:
            self._truncate_losses(self.start_epoch)
            config = json.loads((self.run_dir / "config.json").read_text())
            config.setdefault("resumed", []).append({"at_epoch": self.start_epoch, "command": sys.argv,
                                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            config["args"] = vars(self.args)
            atomic_json(config, self.run_dir / "config.json")

    def _truncate_losses(self, epoch: int) -> None:
        """Rows written after the checkpoint are dropped: they will be trained again."""
        path = self.run_dir / "losses.csv"
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= epoch]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)

    # ---- the WGAN-GP step -------------------------------------------------------------------------------------

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.seq_len, self.args.generator_input_dim, device=self.device, generator=generator)

    def critic_step(self) -> torch.Tensor:
        precision = self.args.precision
        # TF32 only when asked: torch's default lets cuDNN RNNs use TF32, which is not the fp32 of the numerics
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=precision == "bf16")
        real = self.train_data[self.sampler.next_indices().to(self.device)]
        b = len(real)
        with torch.no_grad(), autocast:   # the critic's loss needs no generator gradients
            fake = self.G(self.noise(b)).float()
        self.d_optim.zero_grad(set_to_none=True)
        # args.critic_chunk (0: whole batch) runs the passes below on balanced chunks of samples, each chunk's
        # means weighted by its share: exact up to rounding, and each chunk's graph is freed before the next, so
        # the step's peak memory follows the chunk, not the batch. No chunk of a single sample unless b == 1:
        # torch's CPU InstanceNorm backward is wrong for a batch of one (its grad reshapes to a channels-last view).
        n_chunks = min(-(-b // (self.args.critic_chunk or b)), max(1, b // 2))
        parts = [slice(b * i // n_chunks, b * (i + 1) // n_chunks) for i in range(n_chunks)]
        d_real, d_fake, gp = (torch.zeros((), device=self.device) for _ in range(3))
        # real and fake in one forward and one backward (cuDNN allowed): the critic has no cross-sample coupling
        # (InstanceNorm and LSTMs are per sample), so this equals two separate calls up to rounding
        for part in parts:
            n, share = part.stop - part.start, (part.stop - part.start) / b
            with autocast:
                scores = self.D(torch.cat([real[part], fake[part]])).float()
            d_real_part, d_fake_part = scores[:n].mean() * share, scores[n:].mean() * share
            (d_fake_part - d_real_part).backward()
            d_real, d_fake = d_real + d_real_part.detach(), d_fake + d_fake_part.detach()
        # The penalty needs a double backward, which the fused RNN kernels lack (cuDNN raises; oneDNN falls back
        # to a slow generic path) and which torch's native cells make hold one weight-sized gradient per time
        # step: the critic's LeanLSTMs run unrolled instead (lean_lstm.py). cuDNN stays off for any other RNN.
        eta = torch.rand(b, 1, 1, device=self.device)   # one draw for the whole batch, whatever the chunks
        for part in parts:
            share = (part.stop - part.start) / b
            with unrolled(self.D), torch.backends.cudnn.flags(enabled=False), autocast:
                gp_part = gradient_penalty(self.D, real[part], fake[part], self.args.gradient_penalty_lambda_term,
                                           self.args.gp_norm, eta[part]).float() * share
            gp_part.backward()
            gp += gp_part.detach()
        if self.world > 1:
            average_gradients(self.D, self.world)
        self.d_optim.step()
        return torch.stack([d_fake - d_real + gp, d_real, d_fake, gp]).detach()

    def generator_step(self) -> torch.Tensor:
        precision = self.args.precision
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        self.D.requires_grad_(False)   # only the generator's gradients are needed
        self.g_optim.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=precision == "bf16"):
            score = self.D(self.G(self.noise(self.batch_size))).float().mean()
        (-score).backward()
        if self.world > 1:
            average_gradients(self.G, self.world)
        self.g_optim.step()
        self.D.requires_grad_(True)
        return -score.detach()   # reported with the original's sign: lower is better for the generator

    def train_epoch(self) -> dict[str, float]:
        self.G.train()
        self.D.train()
        critic = torch.stack([self.critic_step() for _ in range(self.args.discriminator_train_steps)]).mean(0)
        g_loss = self.generator_step()
        values = torch.cat([g_loss.reshape(1), critic])
        if self.world > 1:   # the epoch's losses averaged over ranks
            dist.all_reduce(values)
            values /= self.world
        values = values.tolist()   # one device sync per epoch
        return dict(zip(LOSS_COLUMNS, values))

    # ---- evaluation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None) -> np.ndarray:
        """n synthetic V, I, T sequences [n, T, 3] (scaled), generated batch by batch in eval mode."""
        self.G.eval()
        out = np.empty((n, self.seq_len, self.n_features), dtype=np.float32)
        for start in range(0, n, self.args.batch_size):
            size = min(self.args.batch_size, n - start)
            out[start:start + size] = self.G(self.noise(size, generator)).float().cpu().numpy()
        self.G.train()
        return out

    def label(self, sequences: np.ndarray) -> np.ndarray:
        """V, I, T of the last L steps but one (L = min(socs, T - socs), as the original) plus the SOC the
        estimator gives for the window ending at each of those steps -> [n, L, 4]."""
        window = self.args.soc_estimator_step
        length = min(window, self.seq_len - window)
        first = self.seq_len - 1 - length   # steps first .. T-2
        out = np.empty((len(sequences), length, 4), dtype=np.float32)
        for start in range(0, len(sequences), 256):   # stream: memory bounded whatever -ess is
            chunk = sequences[start:start + 256]
            # column k: window ending at step window-1+k; ~3 MB of activations per 300-step window, so CPU
            # batches stay small
            soc = self.soc.label(chunk, window=window, batch_size=2048 if self.device.type == "cuda" else 256)
            out[start:start + len(chunk), :, :3] = chunk[:, first:first + length]
            out[start:start + len(chunk), :, 3] = soc[:, first - (window - 1):first - (window - 1) + length]
        return out

    def real_segment(self, idx: np.ndarray, paper: bool = False) -> np.ndarray:
        """Real windows over the steps of fake_data (paper: steps 0..L-1, the original's mismatch)."""
        length = min(self.args.soc_estimator_step, self.seq_len - self.args.soc_estimator_step)
        first = 0 if paper else self.seq_len - 1 - length
        return self.real_data[idx, first:first + length]

    def evaluate(self, epoch: int) -> None:
        """<epoch>_epoch/: networks, labelled synthetic data, real sample, PCA and t-SNE. Built in a hidden
        folder and renamed, so a folder that exists is complete. Its randomness is separate from training's."""
        out = self.run_dir / f"{epoch}_epoch"
        tmp = self.run_dir / f".{epoch}_epoch.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(unwrap(self.G).state_dict(), tmp / "generator.pth")
        torch.save(unwrap(self.D).state_dict(), tmp / "discriminator.pth")
        eval_seed = (self.seed * 1_000_003 + epoch) % 2 ** 63
        z_gen = torch.Generator(device=self.device).manual_seed(eval_seed)
        fake = self.label(self.generate(self.args.evaluate_sample_size, z_gen))
        idx = np.random.default_rng(eval_seed).integers(len(self.real_data), size=self.args.evaluate_sample_size)
        real = self.real_segment(idx, paper=self.args.pca_segment == "paper")   # with replacement, as the original
        np.save(tmp / "fake_data.npy", fake)
        np.save(tmp / "real_data.npy", self.real_segment(idx[:REAL_SAMPLE_SAVED]))
        for name, array in metrics.pca_tsne(real, fake, seed=eval_seed % 2 ** 32).items():
            np.save(tmp / f"{name}.npy", array)
        # distinct windows for the metrics: one window on both sides of a post-hoc split would flatter the scores
        atomic_json(self.quality(self.real_segment(np.unique(idx)), fake, eval_seed % 2 ** 32), tmp / "metrics.json")
        shutil.rmtree(out, ignore_errors=True)   # an evaluation of this epoch from before a crash
        os.replace(tmp, out)

    def quality(self, real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
        """The metrics of evaluate.py: quick ones by default, all with --eval-metrics all (TSTR on the shipped
        real test cycles when their window matches -socs)."""
        if self.args.eval_metrics == "quick":
            return metrics.quick_metrics(real, fake, self.scaler, seed)
        test_path = PROJECT_DIR / "data" / "lg_test_300_data.npy"
        test = np.load(test_path) if test_path.is_file() else None
        if test is not None and test.shape[1] != real.shape[1]:
            test = None
        return metrics.all_metrics(real, fake, self.scaler, seed, self.device, test_windows=test,
                                   train_windows=self.real_data)

    # ---- bookkeeping ------------------------------------------------------------------------------------------

    def _record(self, epoch: int, losses: dict[str, float], log) -> None:
        log.writerow([epoch] + [repr(losses[k]) for k in LOSS_COLUMNS])
        for k in LOSS_COLUMNS:
            self.history[k].append(losses[k])
        for net, key in ((self.G, "g"), (self.D, "d")):
            if losses[f"{key}_loss"] < self.best[f"{key}_loss"]:
                self.best[f"{key}_loss"], self.best[f"{key}_epoch"] = losses[f"{key}_loss"], epoch
                name = "best_generator" if key == "g" else "best_discriminator"
                atomic_save(unwrap(net).state_dict(), self.run_dir / f"{name}.pth")
                atomic_json({"loss": losses[f"{key}_loss"], "epoch": epoch}, self.run_dir / f"{name}.json")

    def _project(self, seconds: float, epochs: int) -> None:
        """After the first epoch: what the whole run will take here, before the user waits days for it."""
        total = seconds * epochs
        when = f"{total / 86400:.1f} days" if total >= 86400 else f"{total / 3600:.1f} h"
        print(f"first epoch: {seconds:.1f} s of training; {epochs} epochs at this pace: {when} "
              f"(snapshots every -s {self.args.save_epoch_interval} epochs come on top)", flush=True)
        if total >= 86400 and self.device.type == "cpu":
            print("note: this is the paper's GPU configuration; on a CPU, --preset cpu trains a smaller "
                  "network that learns in hours (see README)", flush=True)

    def _stop_requested(self, stop: dict) -> bool:
        flag = stop["signal"] is not None
        if self.world > 1:   # any rank's signal stops them all at the same epoch
            box = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            flag = bool(box.item())
        return flag

    def train(self) -> Path | None:
        """Train from self.start_epoch to -e; rank 0 alone writes the results folder and prints."""
        lead, a = self.rank == 0, self.args
        if lead:
            self._open_run()
            print(f"{'Resuming' if self.checkpoint else 'Start training'}: {self.run_dir} on {self.device} "
                  f"x{self.world} (seed {self.seed}, data {tuple(self.real_data.shape)}, "
                  f"from epoch {self.start_epoch + 1})", flush=True)
        stop = {"signal": None}

        def request_stop(signum, _frame):   # finish the epoch, checkpoint, exit; a second signal kills
            stop["signal"] = signum
            signal.signal(signum, signal.SIG_DFL)
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=a.gan_epochs, initial=self.start_epoch, desc="epochs") \
            if a.show_progress_bar and lead else None
        log_file = open(self.run_dir / "losses.csv", "a", newline="") if lead else None
        begin, epoch, stopped = time.time(), self.start_epoch, False
        try:
            for epoch in range(self.start_epoch + 1, a.gan_epochs + 1):
                losses = self.train_epoch()
                if lead:
                    self._record(epoch, losses, csv.writer(log_file))
                    log_file.flush()
                    if epoch == self.start_epoch + 1:
                        self._project(time.time() - begin, a.gan_epochs - self.start_epoch)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(g_loss=f"{losses['g_loss']:.4f}", d_loss=f"{losses['d_loss']:.4f}")
                    elif epoch % a.train_report_interval == 0:
                        print(f"[Epoch:{epoch}/{a.gan_epochs}] Time passed:{time.time() - begin:.0f}s, "
                              f"g_loss:{losses['g_loss']:.6f}, d_loss:{losses['d_loss']:.6f}", flush=True)
                if epoch % a.save_epoch_interval == 0:
                    if lead:
                        self.evaluate(epoch)
                    self.save_checkpoint(epoch)
                stopped = self._stop_requested(stop)
                if stopped:
                    break
            if epoch % a.save_epoch_interval != 0:
                self.save_checkpoint(epoch)
        finally:
            for closable in (bar, log_file):
                if closable is not None:
                    closable.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.world > 1:
            dist.destroy_process_group()
        if not lead:
            return None
        if stopped:
            print(f"Stopped after epoch {epoch}; resume with: python train_lstm_gan.py -r {self.run_dir.name}")
        elif a.execute_notebook:
            from run_notebook import execute_notebook
            print(f"Result notebook: {execute_notebook(self.run_dir)}")
        return self.run_dir
