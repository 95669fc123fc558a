"""The paper's LSTM WGAN-GP trainer: the generator and critic of models.py and their Adam optimizers, tied to the
shared loop of gan_trainer_base.py.

    python train_lstm_gan.py                      # the paper's defaults, on the shipped LG 18650HG2 windows
    python train_lstm_gan.py --preset cpu         # the same model and loop sized for a CPU (presets/cpu.json)
    python train_lstm_gan.py -h                   # the flags in four groups (docs/flags.md: the full reference)
"""
import argparse
import sys

import torch
from torch import nn
from torch.optim import Adam

from arg_parser import parse_arg
from common import cli
from gan_trainer_base import GANTrainerBase
from models import build_critic, build_generator


def build_optimizers(args: argparse.Namespace, generator: nn.Module, critic: nn.Module) -> tuple[Adam, Adam]:
    g_optim = Adam(generator.parameters(), lr=args.generator_learning_rate, weight_decay=args.generator_weight_decay,
                   betas=(args.generator_adam_beta1, args.generator_adam_beta2))
    d_optim = Adam(critic.parameters(), lr=args.discriminator_learning_rate,
                   weight_decay=args.discriminator_weight_decay,
                   betas=(args.discriminator_adam_beta1, args.discriminator_adam_beta2))
    return g_optim, d_optim


class TrainLSTMGAN(GANTrainerBase):
    trainer_name = "lstm_gan"

    def build_models(self) -> tuple[nn.Module, nn.Module]:
        n_classes = len(self.class_names)
        return (build_generator(self.args, self.seq_len, n_classes, self.temperature_anchor, self.physics),
                build_critic(self.args, n_classes))

    def build_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return build_optimizers(self.args, self.G, self.D)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when training ends, 2 on bad input, 128 + the signal's number (130, 143) after a SIGINT or SIGTERM
    stop (the epoch finished and checkpointed), as shells expect."""
    args = parse_arg(argv)

    def train() -> int:
        trainer = TrainLSTMGAN(args, argv)
        trainer.train()
        return 0 if trainer.stopped_by is None else 128 + trainer.stopped_by
    return cli(train)


if __name__ == "__main__":
    sys.exit(main())
