"""Where the training runs: device and precision, memory and the critic step's chunks, the processes of a torchrun
job (DDP by hand), and the random streams a checkpoint keeps. No networks, no files."""
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


# ----------------------------------------------------------------------------------------------------------------
# device and precision

def set_tf32(precision: str) -> None:
    """TF32 only when asked: torch's default lets cuDNN RNNs use TF32, which is not the fp32 of the numerics."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


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



# ----------------------------------------------------------------------------------------------------------------
# memory and the critic step's chunks

# Peak bytes of one critic-step chunk per sample x step x critic hidden unit (summed over its LSTMs), the penalty's
# double backward on the lean path being the larger pass. Measured on the CPU at the paper's widths (RSS over the
# process's 0.5 GiB), with the recurrence as one Function (lean_lstm.py): 155 at 64 x 600 whole, 239 at 64 x 600
# in chunks of 8 (a chunk's fixed share: weights, their gradients, glibc's heap).
CRITIC_BYTES_PER_UNIT = 240
CHUNKED_MMAP_THRESHOLD = 4 << 20   # glibc's mmap threshold while the critic step runs in chunks on the CPU


def free_memory(device: torch.device) -> int:
    """Bytes the step may use: free GPU memory, or MemAvailable of the machine (Linux) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30   # not Linux: assume a laptop's 8 GB


def chunk_count(batch: int, chunk: int) -> int:
    """How many balanced chunks a critic step of batch samples runs in for --critic-chunk chunk (0: the whole batch).
    No chunk of a single sample unless batch == 1: torch's CPU InstanceNorm backward is wrong for a batch of one."""
    return min(-(-batch // (chunk or batch)), max(1, batch // 2))


def auto_critic_chunk(batch: int, seq_len: int, critic_units: int, budget: int) -> int:
    """The largest chunk whose estimated peak fits in budget bytes (0: the whole batch fits)."""
    chunk = max(2, budget // (CRITIC_BYTES_PER_UNIT * seq_len * critic_units))
    return 0 if chunk >= batch else int(chunk)


def pick_critic_chunk(critic: nn.Module, batch: int, seq_len: int, device: torch.device, devices: int
                      ) -> tuple[int, str]:
    """--critic-chunk not given: the whole batch if its estimated peak fits in half the free memory, else the
    largest chunk that does (exact up to rounding either way) -> (the chunk, the line that says so). devices: the
    GPUs that DataParallel splits each chunk over (1 on the CPU)."""
    units = sum(m.hidden_size for m in unwrap(critic).modules() if isinstance(m, nn.LSTM))
    budget = free_memory(device) * devices // 2
    chunk = auto_critic_chunk(batch, seq_len, units, budget)
    n_chunks = chunk_count(batch, chunk)
    size = -(-batch // n_chunks)
    estimate = CRITIC_BYTES_PER_UNIT * seq_len * units * size / devices
    picked = f"{chunk} of {batch} samples, run as {n_chunks} chunks of {size}" if chunk else \
        f"whole batch of {batch} samples"
    return chunk, (f"critic chunk: {picked} (estimated peak {estimate / 2**30:.1f} GiB of "
                   f"{budget * 2 / devices / 2**30:.1f} GiB free on {device}; set --critic-chunk to choose)")



# ----------------------------------------------------------------------------------------------------------------
# several GPUs (DataParallel) and processes (torchrun)

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


def shared_seed(seed: int | None, world: int) -> int:
    """--seed, or a drawn one, the same on every rank."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    if world > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when it is true on any (a signal to one rank stops them all at the same epoch)."""
    if world > 1:
        box = torch.tensor([float(flag)], device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        flag = bool(box.item())
    return flag



# ----------------------------------------------------------------------------------------------------------------
# random streams

def rng_state(device: torch.device, sampler) -> dict:
    """This process's random streams, the batch sampler's (its state_dict()) with them, in forms
    torch.load(weights_only=True) accepts (tuples, lists, tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "sampler": sampler.state_dict()}


def set_rng_state(state: dict, device: torch.device, sampler) -> None:
    sampler.load_state_dict(state["sampler"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(device: torch.device, sampler, world: int) -> list[dict]:
    """Every rank's rng_state, one list entry per rank (gathered on every rank under torchrun)."""
    if world == 1:
        return [rng_state(device, sampler)]
    states = [None] * world
    dist.all_gather_object(states, rng_state(device, sampler))
    return states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
