"""Run by tests/test_ddp.py under torchrun: trains, then saves this rank's networks so the test can check that
every rank ended with the same weights."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from arg_parser import parse_arg  # noqa: E402
from runtime import unwrap  # noqa: E402
from train_lstm_gan import TrainLSTMGAN  # noqa: E402

out, argv = Path(sys.argv[1]), sys.argv[2:]
trainer = TrainLSTMGAN(parse_arg(argv), argv)
trainer.train()
torch.save({"G": unwrap(trainer.G).state_dict(), "D": unwrap(trainer.D).state_dict()},
           out / f"rank{os.environ['RANK']}.pt")
