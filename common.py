"""What every command shares: the one-line error for bad input (UserError, OneLineParser, cli), the device
resolution, the one atomic file write and the small file helpers (project_default, sha256), and glibc's heap
setting for the CPU steps."""
import argparse
import ctypes
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PROJECT_DIR = Path(__file__).resolve().parent


class UserError(ValueError):
    """Bad input: printed as one line (file, problem, fix), exit code 2, nothing written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; users asked for one line naming the problem."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"error: {message} (see python {self.prog} -h)\n")
        sys.exit(2)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value
    return parse


def cli(run: Callable[[], object]) -> int:
    """A command's main: its UserError becomes `error: ...` on stderr and exit code 2; an int that run returns is
    the exit code, anything else means 0."""
    try:
        code = run()
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def resolve_device(name: str, gpus: list[int] | None = None) -> tuple[torch.device, list[int]]:
    """--device (auto | cpu | cuda | cuda:N) and --gpus -> (the main device, the GPU ids to use)."""
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


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> None:
    """Write text, bytes, or whatever content(tmp_path) writes, to a hidden temporary file in path's folder, then
    rename it over path: a reader (or a resume) never sees half a file, and an interrupted or failed write (a full
    disk) leaves the previous file as it was and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def atomic_npy(path: str | Path, array) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:   # a file object: np.save would add .npy to the temporary file's name
            np.save(f, array)
    atomic_write(path, save)


def project_default(path: str, default: str) -> Path:
    """Defaults are relative to the project, so the command also works when started from another folder."""
    p = Path(path)
    if path == default and not p.exists() and (PROJECT_DIR / default).exists():
        return PROJECT_DIR / default
    return p


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


GLIBC_MMAP_THRESHOLD_MAX = 32 << 20   # where glibc's own dynamic threshold ends up on 64-bit Linux


def cap_heap_growth(threshold: int = 4 << 20) -> bool:
    """Have glibc serve blocks >= threshold bytes with mmap, handed back to the system when freed (True if set).
    A double backward through oneDNN's LSTM (the reference's penalty) allocates and frees weight-sized blocks at
    every time step, and a critic step in chunks frees each chunk's graph before the next; on glibc's default heap
    both fragment and the RSS grows with the step count or the chunk count (README: Performance). The cap costs
    page faults, so the whole-batch lean penalty runs with glibc's usual 32 MB. MALLOC_MMAP_THRESHOLD_ in the
    environment wins."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))   # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):                            # not glibc (e.g. musl): nothing to tune
        return False
