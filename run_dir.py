"""A results folder (results/<unix time>_<trainer>) as one object: its config.json, losses.csv, checkpoint.pt,
best_*.pth and <N>_epoch/ folders. The trainer writes runs through it, generate.py and evaluate.py read them
through it. Every file is written atomically; one process at a time may write a run (lock)."""
import csv
import errno
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import UserError, atomic_json, atomic_write

LOSS_COLUMNS = ("g_loss", "d_loss", "d_real", "d_fake", "gp")
CHECKPOINT_FORMAT = 2   # 2: RNG states as tensors and lists, no loss history; 1 (no key): numpy's RNG state as
# an array and the loss history, still read: numpy's array reconstruction is all it needs beyond torch's safe types
LEGACY_SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def write_error(path: Path, err: OSError) -> UserError:
    """A failed write (read-only file system, disk full, a file where a folder should be) as one line."""
    fix = "free some space" if err.errno == errno.ENOSPC else "check that the folder is writable"
    return UserError(f"{path}: cannot write ({err.strerror or type(err).__name__}); {fix} and resume with -r")


def read_network(path: Path) -> dict:
    """A saved network's state dict (generator.pth, discriminator.pth, best_*.pth), safely (weights_only: loading
    never runs code), without the 'module.' prefix that the original's DataParallel files carry. Raises what
    torch.load raises; each caller says what the file was for."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, results_dir: str | Path, trainer_name: str) -> "RunDir":
        """results/<unix time>_<trainer>; mkdir is atomic, so two runs started in the same second still get
        different folders (the later one takes the next free second)."""
        base = Path(results_dir)
        try:
            base.mkdir(parents=True, exist_ok=True)
            stamp = int(time.time())
            while True:
                try:
                    (base / f"{stamp}_{trainer_name}").mkdir()
                    return cls(base / f"{stamp}_{trainer_name}")
                except FileExistsError:
                    stamp += 1
        except OSError as err:
            raise write_error(base, err) from None

    @classmethod
    def open(cls, results_dir: str | Path, name: str) -> "RunDir":
        path = Path(results_dir) / name
        if not name.strip() or not path.is_dir() or path.resolve() == Path(results_dir).resolve():
            raise UserError(f"{path}: no such run; list {results_dir} for run names or pass --results-dir")
        return cls(path)

    def lock(self) -> None:
        """One writer per run: an exclusive lock on the folder itself, held until the process ends or unlock()."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.path}: another process is training this run; wait for it to finish "
                            f"(or stop it) and resume then") from None
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ---- config.json ------------------------------------------------------------------------------------------

    def read_config(self) -> dict:
        path = self.path / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = None
        if not isinstance(config, dict) or not isinstance(config.get("args"), dict) or "seq_len" not in config:
            raise UserError(f"{path}: missing or damaged; is {self.path} a run folder written by "
                            f"train_lstm_gan.py? (restore config.json or start a new run)")
        return config

    def write_config(self, config: dict) -> None:
        try:
            atomic_json(self.path / "config.json", config)
        except OSError as err:
            raise write_error(self.path / "config.json", err) from None

    def record_resume(self, epoch: int, args: dict) -> None:
        """config.json keeps the flags the run trains with now and a list of its resumptions."""
        config = self.read_config()
        config.setdefault("resumed", []).append({"at_epoch": epoch, "command": sys.argv,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        config["args"] = args
        self.write_config(config)

    # ---- losses.csv ---------------------------------------------------------------------------------------------

    def start_losses(self) -> None:
        try:
            atomic_write(self.path / "losses.csv", ",".join(("epoch",) + LOSS_COLUMNS) + "\r\n")
        except OSError as err:
            raise write_error(self.path / "losses.csv", err) from None

    def read_losses(self) -> list[list[str]]:
        path = self.path / "losses.csv"
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if rows[0] != ["epoch", *LOSS_COLUMNS] or not all(r and r[0].isdigit() for r in rows[1:]):
                raise ValueError
        except (OSError, ValueError, IndexError, csv.Error):
            raise UserError(f"{path}: missing or damaged; restore it, or start a new run") from None
        return rows

    def truncate_losses(self, epoch: int) -> None:
        """Rows written after the checkpoint are dropped: they will be trained again."""
        rows = self.read_losses()
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= epoch]
        try:
            atomic_write(self.path / "losses.csv", "".join(",".join(r) + "\r\n" for r in kept))
        except OSError as err:
            raise write_error(self.path / "losses.csv", err) from None

    def append_losses(self, epoch: int, losses: dict[str, float]) -> None:
        try:
            with open(self.path / "losses.csv", "a", newline="") as f:
                csv.writer(f).writerow([epoch] + [repr(losses[k]) for k in LOSS_COLUMNS])
        except OSError as err:
            raise write_error(self.path / "losses.csv", err) from None

    # ---- checkpoint.pt, best_*.pth --------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def read_checkpoint(self) -> dict:
        """weights_only=True: a checkpoint holds tensors, numbers, strings, lists and dicts, so loading one can
        never run code (a pickled object's __reduce__ is refused)."""
        path = self.checkpoint_path
        if not path.is_file():
            raise UserError(f"{path}: the run has no checkpoint to resume from (it stopped before its first save); "
                            f"start a new run instead")
        try:
            with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:   # damaged, foreign, or holding objects that safe loading refuses
            raise UserError(f"{path}: not a loadable checkpoint ({type(err).__name__}; a damaged file, or one "
                            f"written by an older version or by someone else); start a new run instead") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format", 1) not in (1, CHECKPOINT_FORMAT):
            raise UserError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT} (written by another version "
                            f"of train_lstm_gan.py); start a new run instead")
        return checkpoint

    def write_checkpoint(self, state: dict) -> None:
        self.save(self.checkpoint_path, {**state, "format": CHECKPOINT_FORMAT})

    def write_best(self, name: str, state_dict: dict, loss: float, epoch: int) -> None:
        self.save(self.path / f"{name}.pth", state_dict)
        self.save(self.path / f"{name}.json", {"loss": loss, "epoch": epoch})

    def save_copy(self, source: Path, name: str) -> None:
        """A copy of source (the result notebook) in the run folder: complete or absent."""
        try:
            atomic_write(self.path / name, lambda tmp: shutil.copyfile(source, tmp))
        except OSError as err:
            raise write_error(self.path / name, err) from None

    def save(self, path: Path, obj) -> None:
        """obj to path: JSON for a .json, torch.save otherwise; a failed write is one line."""
        try:
            if path.suffix == ".json":
                atomic_json(path, obj)
            else:
                atomic_write(path, lambda tmp: torch.save(obj, tmp))
        except OSError as err:
            raise write_error(path, err) from None

    # ---- <N>_epoch/ -------------------------------------------------------------------------------------------------

    def epochs(self) -> dict[int, Path]:
        """{epoch: folder} of the saved epochs (<N>_epoch/ holding generator.pth), in epoch order."""
        found = {}
        for p in self.path.glob("*_epoch"):
            head = p.name[:-len("_epoch")]
            if head.isdigit() and (p / "generator.pth").is_file():
                found[int(head)] = p
        return dict(sorted(found.items()))

    def epoch(self, epoch: int | None) -> tuple[int, Path]:
        """(epoch, folder): the given saved epoch, or the latest when None."""
        epochs = self.epochs()
        if not epochs:
            raise UserError(f"{self.path}: no saved epoch (<N>_epoch/generator.pth) yet; train until the first "
                            f"-s interval")
        epoch = max(epochs) if epoch is None else epoch
        if epoch not in epochs:
            raise UserError(f"{self.path}: epoch {epoch} was not saved; saved epochs: {', '.join(map(str, epochs))}")
        return epoch, epochs[epoch]

    def commit_epoch(self, epoch: int, fill: Callable[[Path], None]) -> Path:
        """fill(folder) writes <epoch>_epoch/ in a hidden folder that is then renamed: a folder that exists is
        complete. A failure leaves no hidden folder."""
        out, tmp = self.path / f"{epoch}_epoch", self.path / f".{epoch}_epoch.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            fill(tmp)
            shutil.rmtree(out, ignore_errors=True)   # an evaluation of this epoch from before a crash
            os.replace(tmp, out)
        except OSError as err:
            raise write_error(out, err) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
