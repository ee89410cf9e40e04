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


class LitTiedLM(pl.LightningModule):
    """A tiny next-token model whose output layer shares the input embedding (tied), on token batches."""

    def __init__(self, vocab: int = 20, dim: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.decoder = torch.nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.decoder(h + self.fc2(torch.relu(self.fc1(h))))

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)
