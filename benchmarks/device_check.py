"""GPU check (for sessions that are lent an accelerator): fusion on CUDA tensors, Sinkhorn on the GPU,
BN re-estimation on synthetic inputs, linear compensation (least squares on calibration batches), and a short
training run with the callback, compared against the same steps on the CPU.

    python benchmarks/device_check.py            # uses cuda if available, else says so and exits 0
    python benchmarks/device_check.py --device cpu   # exercise the same path on the CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import lightning.pytorch as pl
import torch

from lightning_intrafusion import IntraFusionCallback, OTConfig, prune
from lightning_intrafusion.datasets import DigitsDataModule
from lightning_intrafusion.models import SmallMobileNet, SmallResNet, SmallTransformer, SmallVGG, resnet18


def grouped_convnet() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10))


def compare(name, factory, x, device, calibrate=False, **kwargs):
    """The same steps on the CPU and on ``device``; ``calibrate``: 4 random batches like ``x``, on the step's
    device, as calibration data (linear compensation and BN re-estimation)."""
    torch.manual_seed(0)
    base = factory().eval()
    batches = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = {}
    for dev in ("cpu", device):
        for solver in ("emd", "sinkhorn"):
            model = copy.deepcopy(base).to(dev)
            if calibrate:
                kwargs["calibration_data"] = [b.to(dev) for b in batches]
            t = time.perf_counter()
            prune(model, x.to(dev), 0.5, ot_config=OTConfig(solver=solver), **kwargs)
            if dev != "cpu":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            with torch.no_grad():
                out = model.eval()(x.to(dev)).float().cpu()
            devices = {p.device.type for p in model.parameters()}
            results[(dev, solver)] = (out, seconds, devices)
    for solver in ("emd", "sinkhorn"):
        cpu_out, cpu_s, _ = results[("cpu", solver)]
        dev_out, dev_s, devices = results[(device, solver)]
        diff = (cpu_out - dev_out).abs().max().item()
        print(f"{name:20s} {solver:8s} params on {sorted(devices)}  max |cpu - {device}| = {diff:.2e}  "
              f"cpu {cpu_s:.3f}s  {device} {dev_s:.3f}s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"command: python benchmarks/device_check.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    images = torch.randn(16, 1, 8, 8)
    compare("vgg", lambda: SmallVGG(32), images, args.device)
    compare("resnet", lambda: SmallResNet(16), images, args.device)
    compare("transformer", lambda: SmallTransformer(), images, args.device, channel_blocks={"*.attn.q": 16})
    compare("transformer (nn.MHA)", lambda: SmallTransformer(attention="torch"), images, args.device,
            include=["*.attn", "*.fc1"])
    compare("grouped conv", grouped_convnet, images, args.device)
    compare("mobilenet (SE)", lambda: SmallMobileNet(se=True), images, args.device)
    compare("resnet18", resnet18, torch.randn(2, 3, 32, 32), args.device)
    compare("resnet (synthetic BN)", lambda: SmallResNet(16), images, args.device, calibration_data="synthetic")
    compare("vgg (linear comp.)", lambda: SmallVGG(32), images, args.device, calibrate=True)
    compare("transformer (linear comp.)", lambda: SmallTransformer(attention="torch"), images, args.device,
            calibrate=True, include=["*.attn", "*.fc1"])

    pl.seed_everything(0)
    sys.path.insert(0, "tests")
    from lit import LitClassifier

    cb = IntraFusionCallback(0.5, start=1, end=2, schedule="linear", recalibrate_batches=4, compensation="linear")
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=4, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = LitClassifier(width=16)
    trainer.fit(model, datamodule=DigitsDataModule())
    print(f"fit on {accelerator}: {cb.fired} events, params {sum(p.numel() for p in model.parameters()):,}, "
          f"val_acc {float(trainer.callback_metrics['val_acc']):.3f}, records "
          + "; ".join(f"{r['acc_pre']:.3f}->{r['acc_post']:.3f} (default {r['acc_post_default']:.3f})" for r in cb.records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
