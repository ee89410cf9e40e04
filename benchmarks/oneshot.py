"""One-shot, data-free pruning on digits: default vs Intra-Fusion (paper preset) vs Intra-Fusion
(our defaults), each without data, with calibration data re-estimating BatchNorm statistics only (the
issue's "normalisation re-estimation"), with calibration data and linear compensation (for every method
alike) and with synthetic BN recalibration; no fine-tuning.

    python benchmarks/oneshot.py            # full table (trains and caches 10 models per architecture once)
    python benchmarks/oneshot.py --sweep    # also sweep OTConfig.max_cost (the BatchNorm groups' discard cost)
    python benchmarks/oneshot.py --sweep-without-bn   # also sweep the distances of groups without BN
                                                      # (max_cost_without_bn, max_cost_without_bn_compensated)
    python benchmarks/oneshot.py --parts    # also prune the transformers' MLP neurons and heads separately
    python benchmarks/oneshot.py --extra    # also MobileNetV2-style nets (with and without SE gates), and the
                                            # depthwise rule on them with re-estimated BN statistics
    python benchmarks/oneshot.py --ablations   # each OTConfig choice of our defaults against its alternative
    python benchmarks/oneshot.py --refit    # also calibration with the layer-wise refit (compensation="refit")
    python benchmarks/oneshot.py --timing-only   # only the seconds of one step on a ResNet-18 and a ViT-B-width net
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_intrafusion import OTConfig, prune, synthesize_inputs
from lightning_intrafusion.datasets import digits_tensors
from lightning_intrafusion.models import SmallMobileNet, SmallResNet, SmallTransformer, SmallVGG, resnet18
from pinned_training import load_or_train

CACHE = os.path.join(os.path.dirname(__file__), ".cache")
SPARSITIES = (0.3, 0.5, 0.7)
MODELS = {
    "vgg": (lambda: SmallVGG(width=32), {}),
    "resnet": (lambda: SmallResNet(width=16), {}),
    "transformer": (
        lambda: SmallTransformer(dim=64, heads=4, mlp=128),
        {"include": ["*.fc1", "*.attn.q"], "channel_blocks": {"*.attn.q": 16}},
    ),
    "transformer (nn.MHA)": (
        lambda: SmallTransformer(dim=64, heads=4, mlp=128, attention="torch"),
        {"include": ["*.fc1", "*.attn"]},
    ),
}


# --extra: architectures beyond the benchmark set
EXTRA = {
    "mobilenet": (lambda: SmallMobileNet(width=16), {}),
    "mobilenet (SE)": (lambda: SmallMobileNet(width=16, se=True), {}),
}

# --parts: the transformers' two kinds of groups pruned on their own (same trained models)
PARTS = {
    "transformer": {"MLP only": {"include": ["*.fc1"]},
                    "heads only": {"include": ["*.attn.q"], "channel_blocks": {"*.attn.q": 16}}},
    "transformer (nn.MHA)": {"MLP only": {"include": ["*.fc1"]}, "heads only": {"include": ["*.attn"]}},
}


def train(model: nn.Module, train_set, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(train_set) + 63) // 64))
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def _cache_path(name: str, seed: int) -> str:
    suffix = "_mha" if "MHA" in name else "_se" if "SE" in name else ""
    return os.path.join(CACHE, f"{name.split()[0]}{suffix}_seed{seed}.pt")


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return {**MODELS, **EXTRA}[name][0]()


def train_from_seed(name: str, seed: int) -> nn.Module:
    """Model ``name`` trained from seed ``seed`` (initialisation and data order); run by :func:`trained` in a
    pinned child process."""
    return train(_build(name, seed), digits_tensors()[0], seed=seed)


def trained(name: str, seed: int = 0) -> nn.Module:
    """The model trained from seed ``seed``, cached on disk (trained reproducibly where missing:
    ``pinned_training.py``)."""
    return load_or_train(_cache_path(name, seed), _build(name, seed), "oneshot", "train_from_seed", name, seed)


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item() * 100


def variants(max_cost: float, has_batchnorm: bool):
    out = {
        "default": dict(method="default"),
        "if-paper": dict(ot_config=OTConfig.paper()),
        "if-ours": dict(ot_config=OTConfig(max_cost=max_cost)),
    }
    if has_batchnorm:  # ablation: what the data-free BN variance correction adds
        out["if-ours w/o var. corr."] = dict(ot_config=OTConfig(max_cost=max_cost, correct_variance=False))
    return out


def run_cell(model, name, sparsity, extra, train_set, test_set, calibrate, scope=None):
    """Prune a copy of ``model`` and measure it; ``calibrate``: False (no data), True (8 training batches as
    ``calibration_data``: BN statistics re-estimated and the means of removed channels compensated) or a
    list of batches to use instead."""
    pruned = copy.deepcopy(model)
    x = test_set.tensors[0][:8]
    calib = calibrate if isinstance(calibrate, list) else None
    if calibrate is True:
        calib = [b[0] for b in DataLoader(train_set, batch_size=64, shuffle=False)][:8]
    report = prune(pruned, x, sparsity, calibration_data=calib, **(MODELS[name][1] if scope is None else scope), **extra)
    return accuracy(pruned, test_set), report


def mean_std(values) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.1f} ±{t.std():.1f}" if len(values) > 1 else f"{t.mean():.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10, help="independently trained models per architecture")
    parser.add_argument("--sweep", action="store_true", help="sweep max_cost (the BatchNorm groups' discard cost) around our default")
    parser.add_argument("--sweep-without-bn", action="store_true",
                        help="sweep max_cost_without_bn (the discard distance of groups without BatchNorm)")
    parser.add_argument("--parts", action="store_true", help="also prune the transformers' MLP neurons and heads separately")
    parser.add_argument("--ablations", action="store_true", help="each OTConfig default against its alternative")
    parser.add_argument("--extra", action="store_true", help="also MobileNetV2-style nets (not in the issue's set)")
    parser.add_argument("--refit", action="store_true", help="also calibration with the layer-wise refit")
    parser.add_argument("--max-cost", type=float, default=OTConfig().max_cost)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true", help="only the timing block (ResNet-18, ViT-B-width transformer)")
    args = parser.parse_args()
    if args.extra:
        MODELS.update(EXTRA)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.timing_only:
        print(f"command: python benchmarks/oneshot.py {' '.join(sys.argv[1:])}".rstrip())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        timing()
        return
    train_set, test_set = digits_tensors()
    seeds = range(args.seeds)
    print(f"command: python benchmarks/oneshot.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits: {len(train_set)} train / "
          f"{len(test_set)} test; accuracy: mean ±std over {args.seeds} models trained from different seeds\n")
    print("| model | sparsity | method | acc | acc +BN re-estimation | acc +calibration | acc +synthetic BN recal "
          "| params | MACs | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    # (name, sparsity, label) -> {column: per-model accuracies}, columns as in COLUMNS (BN nets only for the last two)
    results = {}
    for name in MODELS:
        models = [trained(name, seed) for seed in seeds]
        has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
        print(f"| {name} | 0% | dense | {mean_std([accuracy(m, test_set) for m in models])} | | | | | | |")
        # data-free inputs distilled from each unpruned model's BN statistics (what calibration_data="synthetic"
        # does inside prune(); distilled once per model here, since they depend only on the unpruned model)
        distilled = [synthesize_inputs(m, test_set.tensors[0][:8]) for m in models] if has_batchnorm else []
        for s in SPARSITIES:
            for label, extra in variants(args.max_cost, has_batchnorm).items():
                runs = [run_cell(m, name, s, extra, train_set, test_set, False) for m in models]
                report = runs[0][1]
                seconds = sum(r.seconds for _, r in runs) / len(runs)
                cell = results[name, s, label] = {NO_DATA: [a for a, _ in runs]}
                cell[CALIBRATION] = [run_cell(m, name, s, extra, train_set, test_set, True)[0] for m in models]
                if has_batchnorm:
                    cell[BN_ONLY] = [run_cell(m, name, s, dict(extra, compensation="none"), train_set, test_set, True)[0]
                                     for m in models]
                    cell[SYNTHETIC] = [run_cell(m, name, s, extra, train_set, test_set, d)[0]
                                       for m, d in zip(models, distilled)]
                shown = [mean_std(cell[c]) if c in cell else "n/a (no BatchNorm)" for c in COLUMNS]
                print(f"| {name} | {s:.0%} | {label} | " + " | ".join(shown) + " | "
                      f"{report.params_after:,} | {report.macs_after:,} | {seconds:.3f} |")
    summarize(results)
    if args.sweep:
        sweep(train_set, test_set, seeds)
    if args.sweep_without_bn:
        sweep_without_bn(train_set, test_set, seeds)
    if args.parts:
        parts(train_set, test_set, seeds, args.max_cost)
    if args.ablations:
        ablations(train_set, test_set, seeds, results)
    if args.extra:
        depthwise_rule(train_set, test_set, seeds, results)
    if args.refit:
        refit(train_set, test_set, seeds, results)
    if not args.no_timing:
        timing()


def _paired(ours, theirs) -> str:
    """Mean of the per-model differences, its standard error, and on how many models ours >= theirs."""
    d = torch.tensor(ours, dtype=torch.float64) - torch.tensor(theirs, dtype=torch.float64)
    se = d.std() / len(d) ** 0.5 if len(d) > 1 else torch.tensor(0.0)
    return f"{d.mean():+.1f} ±{se:.1f} ({int((d >= 0).sum())}/{len(d)})"


# the columns of the main table: no data; 8 training batches re-estimating BN statistics only (compensation="none",
# the "normalisation re-estimation"); the same batches with linear compensation (the default); BN
# statistics re-estimated on inputs distilled from the unpruned model (data-free)
NO_DATA, BN_ONLY, CALIBRATION, SYNTHETIC = "", " +BN re-estimation", " +calibration", " +synthetic recal"
COLUMNS = (NO_DATA, BN_ONLY, CALIBRATION, SYNTHETIC)
# the summary's sets of columns: the cells (without data and with normalisation re-estimation), linear
# compensation (the same repair for every method), and the data-free recalibration
COLUMN_SETS = (((NO_DATA, BN_ONLY), " without data and with BN re-estimation (the issue's cells)"),
               ((CALIBRATION,), " with calibration data and linear compensation (every method)"),
               ((SYNTHETIC,), " with synthetic BN recal (data-free)"))


def summarize(results) -> None:
    """How often (on mean accuracy) our defaults are at or above plain pruning and the paper preset, and
    strictly above, in each set of columns; and the paired per-model differences behind each cell."""
    cells = [(name, s) for name, s, label in results if label == "default"]
    print()
    sets = {"issue's benchmark set": [c for c in cells if c[0] not in EXTRA], "extra architectures": [c for c in cells if c[0] in EXTRA]}
    for set_name, set_cells in sets.items():
        for columns, tag in COLUMN_SETS:
            for rival in ("default", "if-paper"):
                wins, above, losses, total = 0, 0, [], 0
                for name, s in set_cells:
                    for column in columns:
                        if column not in results[name, s, "default"]:
                            continue
                        total += 1
                        ours, theirs = (_mean(results[name, s, label][column]) for label in ("if-ours", rival))
                        if ours >= theirs:
                            wins += 1
                            above += ours > theirs
                        else:
                            losses.append(f"{name} {s:.0%}{column} ({ours:.1f} vs {theirs:.1f})")
                if total:
                    print(f"{set_name}{tag}: if-ours >= {rival}: {wins}/{total} cells, above in {above}"
                          + (f"; below: {', '.join(losses)}" if losses else ""))
    print("\nPaired differences, if-ours minus rival on the same trained model: mean ±standard error "
          "(models where if-ours >= rival)\n")
    print("| model | sparsity | " + " | ".join(f"vs {rival}{column}" for column in COLUMNS for rival in ("default", "if-paper"))
          + " |")
    print("|---|---|" + "---|" * (2 * len(COLUMNS)))
    for name, s in cells:
        columns = []
        for column in COLUMNS:
            for rival in ("default", "if-paper"):
                if column in results[name, s, "default"]:
                    columns.append(_paired(results[name, s, "if-ours"][column], results[name, s, rival][column]))
                else:
                    columns.append("")
        print(f"| {name} | {s:.0%} | " + " | ".join(columns) + " |")


# --ablations: one OTConfig choice changed at a time, everything else as in our defaults
ABLATIONS = {
    "producer merge: sum (the release)": {"producer_merge": "sum", "preserve_norm": False},
    "producer merge: average without norm rescale": {"preserve_norm": False},
    "consumer merge: average": {"consumer_merge": "average"},
    "ground metric p=1 (the release)": {"p": 1.0},
    "features: producer rows only": {"features": "producer"},
    "marginals: importance": {"marginals": "importance"},
    "formulation: balanced (the release)": {"formulation": "balanced"},
    "solver: Sinkhorn also without data": {"solver": "sinkhorn"},
    "with linear compensation: merge as with mean compensation (no near-duplicate limit)": {"max_cost_regressed": None},
    "without data: no Gaussian compensation (groups without BN merged by OT alone)": {"gaussian_compensation": False},
    "without data: compensate_merged (merged by OT as alone, then regressed on the merged neurons)": {"compensate_merged": True},
}

# --ablations: prune() settings other than OTConfig, changed one at a time
PRUNE_ABLATIONS = {
    "calibration: mean compensation instead of linear": {"compensation": "mean"},
    "calibration: no compensation (BN re-estimation only)": {"compensation": "none"},
}


def ablations(train_set, test_set, seeds, results) -> None:
    """Mean accuracy per architecture (over the three sparsities and the models) of our defaults and of
    each single change to them, on the issue's benchmark set, without data and with calibration data; the
    last column counts the cells where the change is at or above our defaults."""
    names = [n for n in MODELS if n not in EXTRA]
    print("\nAblations: our defaults with one setting changed (mean accuracy over 30/50/70% and "
          f"{len(seeds)} models; +cal: with calibration data)\n")
    print("| setting | " + " | ".join(names) + " | " + " | ".join(f"{n} +cal" for n in names) + " | cells >= defaults |")
    print("|---|" + "---|" * (2 * len(names) + 1))

    def row(label: str, per_cell) -> None:
        means, recal, cells = [], [], 0
        for name in names:
            no_data = [per_cell[name, s][0] for s in SPARSITIES]
            means.append(sum(no_data) / len(no_data))
            for s in SPARSITIES:
                for column, value in zip((NO_DATA, CALIBRATION), per_cell[name, s]):
                    cells += value >= _mean(results[name, s, "if-ours"][column]) - 1e-9
            if len(per_cell[name, SPARSITIES[0]]) > 1:
                recal.append(sum(per_cell[name, s][1] for s in SPARSITIES) / len(SPARSITIES))
        total = sum(len(per_cell[name, s]) for name in names for s in SPARSITIES)
        print(f"| {label} | " + " | ".join(f"{m:.1f}" for m in means) + " | "
              + " | ".join(f"{r:.1f}" for r in recal) + f" | {cells}/{total} |")

    row("our defaults", {(n, s): [_mean(results[n, s, "if-ours"][c]) for c in (NO_DATA, CALIBRATION)]
                         for n in names for s in SPARSITIES})
    changes = {label: {"ot_config": OTConfig(**change)} for label, change in ABLATIONS.items()}
    changes.update(PRUNE_ABLATIONS)
    for label, extra in changes.items():
        per_cell = {}
        for name in names:
            models = [trained(name, seed) for seed in seeds]
            for s in SPARSITIES:
                per_cell[name, s] = [_mean([run_cell(m, name, s, extra, train_set, test_set, cal)[0] for m in models])
                                     for cal in (False, True)]
        row(label, per_cell)


# --sweep: the discard cost of BatchNorm groups (OTConfig.max_cost, x the median cost) around our default;
# at 1.5 no removed channel of these nets is discarded (every one is merged, as in the balanced release)
SWEEP = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1, 1.5)


def sweep(train_set, test_set, seeds) -> None:
    """Mean accuracy of our defaults with ``max_cost`` varied, on every BatchNorm architecture, without
    data and with calibration data under mean compensation (linear compensation merges only near-duplicates,
    whatever ``max_cost``: ``OTConfig.max_cost_regressed``), and the share of removed channels that were merged (the rest were
    discarded). Only BatchNorm groups use ``max_cost``; heads, depthwise chains and groups without
    BatchNorm have absolute thresholds of their own."""
    print(f"\nSweep of OTConfig.max_cost (BatchNorm groups; mean accuracy over {len(seeds)} models; "
          "merged: share of all removed channels, every group, merged into a kept one; the others are discarded)\n")
    print("| model | sparsity | data | " + " | ".join(f"{mc:g}" for mc in SWEEP) + " |")
    print("|---|---|---|" + "---|" * len(SWEEP))
    for name in MODELS:
        models = [trained(name, seed) for seed in seeds]
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules()):
            continue
        for s in SPARSITIES:
            rows = {"none": [], "calibration": [], "merged": []}
            for mc in SWEEP:
                extra = dict(ot_config=OTConfig(max_cost=mc))
                runs = [run_cell(m, name, s, extra, train_set, test_set, False) for m in models]
                rows["none"].append(f"{_mean([a for a, _ in runs]):.1f}")
                mean_compensated = dict(extra, compensation="mean")
                rows["calibration"].append(f"{_mean([run_cell(m, name, s, mean_compensated, train_set, test_set, True)[0] for m in models]):.1f}")
                merged = sum(g.merged for _, r in runs for g in r.groups)
                removed = sum(g.width_before - g.width_after for _, r in runs for g in r.groups)
                rows["merged"].append(f"{merged / max(removed, 1):.0%}")
            for data, cells in rows.items():
                print(f"| {name} | {s:.0%} | {data} | " + " | ".join(cells) + " |")


# --sweep-without-bn: the absolute discard distance of groups without BatchNorm (None: like BatchNorm groups),
# without the Gaussian compensation; and with it (the default), the distance of such compensated groups
SWEEP_WITHOUT_BN = (1.0, 1.1, 1.2, 1.3, 1.4, None)
SWEEP_COMPENSATED = (0.5, 0.7, 0.9, 1.1, 1.3)


def sweep_without_bn(train_set, test_set, seeds) -> None:
    """Mean accuracy without data, next to plain pruning, on the issue's architectures that have groups without
    BatchNorm (the transformers' MLP neurons and heads, VGG's hidden classifier layer; the ResNet has none), and
    the paired difference to plain pruning: ``max_cost_without_bn`` varied with ``gaussian_compensation=False``,
    and ``max_cost_without_bn_compensated`` varied under our defaults (Gaussian compensation on)."""
    for field, values, fixed in (("max_cost_without_bn", SWEEP_WITHOUT_BN, {"gaussian_compensation": False}),
                                 ("max_cost_without_bn_compensated", SWEEP_COMPENSATED, {})):
        settings = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "our defaults"
        print(f"\nSweep of OTConfig.{field} without data ({settings}; mean accuracy over {len(seeds)} models; "
              "in brackets: paired difference to plain pruning)\n")
        print("| model | sparsity | default | " + " | ".join(f"{c}" for c in values) + " |")
        print("|---|---|---|" + "---|" * len(values))
        for name in [n for n in MODELS if n not in EXTRA and n != "resnet"]:
            models = [trained(name, seed) for seed in seeds]
            for s in SPARSITIES:
                plain = [run_cell(m, name, s, dict(method="default"), train_set, test_set, False)[0] for m in models]
                cells = []
                for c in values:
                    config = OTConfig(**fixed, **{field: c})
                    accs = [run_cell(m, name, s, dict(ot_config=config), train_set, test_set, False)[0] for m in models]
                    d = torch.tensor(accs) - torch.tensor(plain)
                    cells.append(f"{_mean(accs):.1f} ({d.mean():+.1f})")
                print(f"| {name} | {s:.0%} | {_mean(plain):.1f} | " + " | ".join(cells) + " |", flush=True)


def refit(train_set, test_set, seeds, results) -> None:
    """With calibration data: linear compensation (the default; the main table's +calibration column) against
    the layer-wise refit (``compensation="refit"``), for plain pruning and Intra-Fusion (our defaults)."""
    print(f"\nCalibration data (8 training batches): linear compensation vs layer-wise refit (mean ±std over "
          f"{len(seeds)} models; seconds: one Intra-Fusion step with the refit)\n")
    print("| model | sparsity | default, linear | if-ours, linear | default, refit | if-ours, refit | if-ours refit - default refit (paired) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [n for n in MODELS if n not in EXTRA]:
        models = [trained(name, seed) for seed in seeds]
        for s in SPARSITIES:
            refit_runs = {label: [run_cell(m, name, s, dict(extra, compensation="refit"), train_set, test_set, True) for m in models]
                          for label, extra in (("default", dict(method="default")), ("if-ours", {}))}
            accs = {label: [a for a, _ in runs] for label, runs in refit_runs.items()}
            seconds = _mean([r.seconds for _, r in refit_runs["if-ours"]])
            print(f"| {name} | {s:.0%} | {mean_std(results[name, s, 'default'][CALIBRATION])} | {mean_std(results[name, s, 'if-ours'][CALIBRATION])} | "
                  f"{mean_std(accs['default'])} | {mean_std(accs['if-ours'])} | {_paired(accs['if-ours'], accs['default'])} | {seconds:.2f} |")


def _mean(values) -> float:
    return sum(values) / len(values)


def parts(train_set, test_set, seeds, max_cost: float) -> None:
    """The transformers' MLP neurons and attention heads pruned separately: which kind of group
    moves accuracy, and how fusion does on each."""
    print("\nTransformers, each kind of group pruned on its own (mean ±std over the same models)\n")
    print("| model | groups | sparsity | default | if-paper | if-ours | if-ours - default (paired) |")
    print("|---|---|---|---|---|---|---|")
    for name, scopes in PARTS.items():
        models = [trained(name, seed) for seed in seeds]
        for scope_name, scope in scopes.items():
            for s in SPARSITIES:
                accs = {label: [run_cell(m, name, s, extra, train_set, test_set, False, scope)[0] for m in models]
                        for label, extra in variants(max_cost, False).items()}
                print(f"| {name} | {scope_name} | {s:.0%} | {mean_std(accs['default'])} | {mean_std(accs['if-paper'])} | "
                      f"{mean_std(accs['if-ours'])} | {_paired(accs['if-ours'], accs['default'])} |")


def depthwise_rule(train_set, test_set, seeds, results) -> None:
    """The MobileNets with calibration data and mean or no compensation, where BN statistics are re-estimated
    and ``OTConfig.depthwise_max_cost`` applies: with the rule and without it (depthwise chains merged like any
    channels). Without data the rule is off; with linear compensation every group merges near-duplicates only."""
    print(f"\nMobileNets with calibration data, BN statistics re-estimated (mean accuracy over {len(seeds)} models; in "
          "brackets: paired difference to if-ours and on how many models the variant is at or above it)\n")
    print("| model | sparsity | compensation | default | if-ours | if-ours w/o depthwise rule |")
    print("|---|---|---|---|---|---|")
    loose = dict(ot_config=OTConfig(depthwise_max_cost=None))
    for name in EXTRA:
        models = [trained(name, seed) for seed in seeds]
        for s in SPARSITIES:
            for compensation in ("mean", "none"):
                accs = {label: [run_cell(m, name, s, dict(extra, compensation=compensation), train_set, test_set, True)[0]
                                for m in models]
                        for label, extra in (("default", dict(method="default")), ("if-ours", {}), ("w/o", loose))
                        if compensation == "mean" or label == "w/o"}
                if compensation == "none":  # the main table's "+BN re-estimation" cells
                    accs.update({label: results[name, s, label][BN_ONLY] for label in ("default", "if-ours")})
                print(f"| {name} | {s:.0%} | {compensation} | {_mean(accs['default']):.1f} | {_mean(accs['if-ours']):.1f} | "
                      f"{_mean(accs['w/o']):.1f} ({_paired(accs['w/o'], accs['if-ours'])}) |")


def timing(repeats: int = 3) -> None:
    """Wall time of one 50% step, fusion vs plain pruning in the same run: a ResNet-18 (11M params) and a
    transformer as wide as ViT-B (hidden 768, MLP 3072, 4 blocks; randomly initialised)."""
    cases = (
        ("ResNet-18", resnet18, torch.randn(1, 3, 32, 32), True),
        ("Transformer 768/3072 x4", lambda: SmallTransformer(dim=768, heads=12, mlp=3072, depth=4), torch.randn(1, 1, 8, 8), False),
    )
    for name, factory, x, with_paper in cases:
        torch.manual_seed(0)
        base = factory().eval()
        rows = {}
        variants_ = [("default", dict(method="default")), ("if-ours", {})]
        if with_paper:
            variants_.append(("if-paper", dict(ot_config=OTConfig.paper())))
        for label, extra in variants_:
            times = []
            for _ in range(repeats):
                model = copy.deepcopy(base)
                t = time.perf_counter()
                prune(model, x, 0.5, **extra)
                times.append(time.perf_counter() - t)
            rows[label] = min(times)
        params = sum(p.numel() for p in base.parameters())
        print(f"\n{name} ({params/1e6:.1f}M params), 50% one-shot step, best of {repeats} (includes graph build and MAC counting):")
        for label, t in rows.items():
            print(f"  {label:9s} {t:.3f} s   ratio to default {t / rows['default']:.2f}x")


if __name__ == "__main__":
    main()
