"""A small LightningModule on digits used by the callback tests."""

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from helpers import ChannelShuffleNet, HeadCountNet
from lightning_intrafusion.models import SmallTransformer, SmallVGG


class LitClassifier(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05, optimizer: str = "sgd", scheduler: bool = True,
                 arch: str = "vgg"):
        super().__init__()
        self.save_hyperparameters()
        # "transformer": nn.MultiheadAttention blocks, whose heads the callback can remove;
        # "shuffle": a channel shuffle, one of whose groups cannot be pruned exactly;
        # "head_count": hand-written attention that reshapes with a head-count attribute
        nets = {"vgg": lambda: SmallVGG(width=width), "shuffle": ChannelShuffleNet, "head_count": HeadCountNet,
                "transformer": lambda: SmallTransformer(dim=32, heads=4, mlp=64, attention="torch")}
        self.net = nets[arch]()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if not self.hparams.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}
