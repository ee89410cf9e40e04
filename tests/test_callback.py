"""IntraFusionCallback in real Trainer fits on digits."""

import copy

import pytest
import lightning.pytorch as pl
import torch

from lit import LitClassifier, LitTiedLM
from lightning_intrafusion import IntraFusionCallback, OTConfig, prune, restore_pruned
from lightning_intrafusion.datasets import DigitsDataModule


def _trainer(tmp_path, callbacks, max_epochs=4, **kwargs):
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      deterministic=True, **kwargs)


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_fit_prunes_on_schedule_and_keeps_training(tmp_path):
    pl.seed_everything(0)
    model = LitClassifier()
    dense_params = _params(model)
    cb = IntraFusionCallback(target_sparsity=0.5, start=1, end=3, every=1, schedule="linear")
    trainer = _trainer(tmp_path, [cb], max_epochs=5)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.fired == 3
    sparsities = [r["achieved_sparsity"] for r in cb.records]
    assert sparsities == pytest.approx([1 / 6, 2 / 6, 0.5], abs=0.05)
    params = [r["params"] for r in cb.records]
    assert dense_params > params[0] > params[1] > params[2] == _params(model)
    for r in cb.records:
        assert {"acc_pre", "acc_post", "acc_post_default", "seconds"} <= r.keys()
    # training went on after the last event and recovered
    assert trainer.callback_metrics["val_acc"] > 0.9
    assert trainer.callback_metrics["intrafusion/sparsity"] == pytest.approx(0.5)
    # the optimizer trains the new parameters and the LR schedule was not reset (StepLR gamma 0.7 / epoch)
    opt = trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.7 ** 5)


def test_optimizer_state_is_carried_over_for_kept_channels(tmp_path):
    pl.seed_everything(0)
    model = LitClassifier(optimizer="adam", lr=1e-3, scheduler=False)
    seen = {}

    class Spy(IntraFusionCallback):
        def _rebuild_optimizers(self, trainer, pl_module, optimizer_state, *args):
            seen["before"] = {k: {n: t.clone() for n, t in v["state"].items() if torch.is_tensor(t)}
                              for k, v in optimizer_state.items()}
            super()._rebuild_optimizers(trainer, pl_module, optimizer_state, *args)
            opt = trainer.optimizers[0]
            names = {id(p): n for n, p in pl_module.named_parameters()}
            seen["after"] = {names[id(p)]: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
                             for p, s in opt.state.items()}
            seen["removals"] = args[-1]

    cb = Spy(target_sparsity=0.5, start=1, evaluate=False)
    _trainer(tmp_path, [cb], max_epochs=2).fit(model, datamodule=DigitsDataModule())
    before, after = seen["before"], seen["after"]
    name = "net.features.0.0.weight"  # first conv: output channels pruned
    removed = next(idx for n, side, idx in seen["removals"] if n == "net.features.0.0" and side == "out")
    kept = [i for i in range(before[name]["exp_avg"].shape[0]) if i not in set(removed)]
    assert after[name]["exp_avg"].shape[0] == len(kept)
    assert torch.equal(after[name]["exp_avg"], before[name]["exp_avg"][kept])
    assert torch.equal(after[name]["exp_avg_sq"], before[name]["exp_avg_sq"][kept])
    assert torch.equal(after[name]["step"], before[name]["step"])


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def run(max_epochs, ckpt_path=None, save=False):
        pl.seed_everything(0)
        model = LitClassifier()
        cb = IntraFusionCallback(target_sparsity=0.6, start=1, end=3, every=2, schedule="linear", evaluate=False)
        callbacks = [cb]
        if save:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                                          filename="{epoch}"))
        trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                             enable_checkpointing=save, num_sanity_val_steps=0)
        # unshuffled: the datamodule's shuffling generator is not part of the checkpoint
        trainer.fit(model, datamodule=DigitsDataModule(shuffle=False), ckpt_path=ckpt_path)
        return model, cb

    full, _ = run(5, save=True)
    # epoch=1 checkpoint: after the first event (start of epoch 1), before the second (epoch 3)
    resumed, cb = run(5, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert cb.fired == 2
    assert repr(resumed) == repr(full)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n

    restored = restore_pruned(LitClassifier(), str(tmp_path / "ckpt" / "epoch=4.ckpt"))
    x = torch.randn(4, 1, 8, 8)
    full.eval(), restored.eval()
    assert torch.equal(full(x), restored(x))


def test_attention_heads_pruned_during_fit_and_restored_from_checkpoint(tmp_path):
    pl.seed_everything(0)
    model = LitClassifier(arch="transformer", optimizer="adam", lr=3e-3, scheduler=False)
    cb = IntraFusionCallback(target_sparsity=0.5, epochs=[1, 2], schedule="linear", include=["*.attn", "*.fc1"])
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb, checkpoint], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, datamodule=DigitsDataModule())
    heads = [block.attn.num_heads for block in model.net.blocks]
    assert heads == [2, 2] and all(type(b.attn).__name__ == "PrunableMultiheadAttention" for b in model.net.blocks)
    assert [r["achieved_sparsity"] for r in cb.records] == pytest.approx([0.25, 0.5], abs=0.05)
    assert trainer.callback_metrics["val_acc"] > 0.8  # Adam went on training the pruned heads

    restored = restore_pruned(LitClassifier(arch="transformer"), str(tmp_path / "ckpt" / "last.ckpt"))
    x = torch.randn(4, 1, 8, 8)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))


def test_a_tied_width_pruned_during_fit_stays_tied_in_training_and_from_checkpoint(tmp_path):
    """The output layer shares the input embedding: after each event the two still hold one parameter, which the
    rebuilt optimizer holds once and keeps training; a module rebuilt from the checkpoint is tied the same way."""
    pl.seed_everything(0)
    model = LitTiedLM()
    tokens = torch.utils.data.TensorDataset(torch.randint(0, 20, (64, 9), generator=torch.Generator().manual_seed(0)))
    cb = IntraFusionCallback(target_sparsity=0.5, epochs=[1, 2], schedule="linear", evaluate=False,
                             batch_to_inputs=lambda batch: (batch[0][:, :-1], None))
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb, checkpoint], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, torch.utils.data.DataLoader(tokens, batch_size=16))
    assert cb.fired == 2 and model.decoder.weight is model.embed.weight and model.embed.weight.shape == (20, 8)
    params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params) and any(p is model.embed.weight for p in params)
    assert trainer.optimizers[0].state[model.embed.weight]["exp_avg"].shape == (20, 8)  # trained on after the events
    restored = restore_pruned(LitTiedLM(), str(tmp_path / "ckpt" / "last.ckpt"))
    ids = torch.randint(0, 20, (2, 8))
    assert restored.decoder.weight is restored.embed.weight and torch.equal(restored(ids), model(ids))


def test_head_count_attribute_follows_heads_pruned_during_fit_and_from_checkpoint(tmp_path):
    """Attention that reshapes with ``self.num_heads``: the count follows each event's removed heads
    during the fit, and a fresh module rebuilt from the checkpoint gets it too (same outputs)."""
    pl.seed_everything(0)
    model = LitClassifier(arch="head_count", optimizer="adam", lr=3e-3, scheduler=False)
    cb = IntraFusionCallback(target_sparsity=0.5, epochs=[1, 2], schedule="linear", include=["*.q_proj"])
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb, checkpoint], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.fired == 2 and model.net.attn.num_heads == 2 and model.net.attn.q_proj.out_features == 8
    restored = restore_pruned(LitClassifier(arch="head_count"), str(tmp_path / "ckpt" / "last.ckpt"))
    assert restored.net.attn.num_heads == 2
    x = torch.randn(4, 1, 8, 8)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))


def test_fit_skips_a_group_that_cannot_be_pruned_exactly(tmp_path):
    """on_unsupported="skip": a channel shuffle's group stays whole, the rest is pruned at every event,
    and the checkpoint replays the pruned architecture."""
    pl.seed_everything(0)
    model = LitClassifier(arch="shuffle", optimizer="adam", lr=3e-3, scheduler=False)
    cb = IntraFusionCallback(target_sparsity=0.5, epochs=[1, 2], schedule="linear", on_unsupported="skip")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb, checkpoint], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    with pytest.warns(UserWarning, match="left 1 channel group.*'net.c1'"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.fired == 2
    assert (model.net.c1.out_channels, model.net.c2.out_channels, model.net.fc.in_features) == (8, 4, 4)
    restored = restore_pruned(LitClassifier(arch="shuffle"), str(tmp_path / "ckpt" / "last.ckpt"))
    x = torch.randn(4, 1, 8, 8)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_sparsity=1.0), "target_sparsity"),
    (dict(target_sparsity=-0.1), "target_sparsity"),
    (dict(target_sparsity=0.5, start=4, end=2), "before start"),
    (dict(target_sparsity=0.5, schedule="zigzag"), "Unknown schedule"),
    (dict(target_sparsity=0.5, unit="minute"), "unit"),
    (dict(target_sparsity=0.5, on_unsupported="ignore"), "on_unsupported"),
    (dict(target_sparsity=0.5, schedule=lambda i, n: 0.5 - 0.1 * i, start=1, end=2), "decreases"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IntraFusionCallback(**kwargs)


def test_ot_config_is_kept_as_given_and_resolved_by_each_step():
    assert IntraFusionCallback(0.5, recalibrate_batches=4).settings()["ot_config"]["solver"] == "auto"
    explicit = IntraFusionCallback(0.5, recalibrate_batches=4, ot_config=OTConfig(solver="emd"))
    assert explicit.prune_kwargs["ot_config"].solver == "emd"
    with pytest.raises(TypeError, match="ot_config"):
        IntraFusionCallback(0.5, ot_config={"solver": "emd"})


@pytest.mark.parametrize("compensation", ["linear", "mean", "none"])
def test_recalibrated_event_is_prune_with_recent_batches_as_calibration_data(tmp_path, compensation):
    """With recalibrate_batches the event is ``prune(calibration_data=recent batches)`` (with compensation,
    what removed neurons and heads contributed stays in the consumers); acc_post is the same step without
    data."""
    pl.seed_everything(0)
    model = LitClassifier(arch="transformer", optimizer="adam", lr=3e-3, scheduler=False)
    scope = dict(include=["*.attn", "*.fc1"])
    seen = {}

    class Spy(IntraFusionCallback):
        def _fire(self, trainer, pl_module, inputs):
            seen.update(before=copy.deepcopy(pl_module.net), batches=list(self._recent), example=inputs[:2])
            super()._fire(trainer, pl_module, inputs)
            seen["after"] = copy.deepcopy(pl_module.net)

    cb = Spy(target_sparsity=0.5, epochs=[1], recalibrate_batches=3, compensation=compensation, **scope)
    dm = DigitsDataModule()
    _trainer(tmp_path, [cb], max_epochs=2).fit(model, datamodule=dm)
    assert len(seen["batches"]) == 3

    with_data = copy.deepcopy(seen["before"])
    prune(with_data, seen["example"], 0.5, calibration_data=seen["batches"], compensation=compensation, **scope)
    after = seen["after"].state_dict()
    assert with_data.state_dict().keys() == after.keys()
    assert all(torch.equal(t, after[k]) for k, t in with_data.state_dict().items())

    data_free = copy.deepcopy(seen["before"])  # the same step without data (compensated on modelled inputs)
    prune(data_free, seen["example"], 0.5, compensation=compensation, **scope)
    biases = [k for k in after if k.endswith(("fc2.bias", "out_proj.bias"))]
    assert biases and any(not torch.equal(data_free.state_dict()[k], after[k]) for k in biases) == (compensation != "none")
    if compensation == "linear":  # the kept columns of the consumers too, beyond what the mean repair changes
        mean_only = copy.deepcopy(seen["before"])
        prune(mean_only, seen["example"], 0.5, calibration_data=seen["batches"], compensation="mean", **scope)
        weights = [k for k in after if k.endswith(("fc2.weight", "out_proj.weight"))]
        assert weights and all(not torch.equal(mean_only.state_dict()[k], after[k]) for k in weights)

    @torch.no_grad()
    def accuracy(net):
        net.eval()
        pairs = [(net(x).argmax(1) == y).float() for x, y in dm.val_dataloader()]
        return torch.cat(pairs).mean().item()

    record = cb.records[0]
    assert record["acc_post"] == pytest.approx(accuracy(data_free), abs=1e-6)
    assert record["acc_post_recalibrated"] == pytest.approx(accuracy(with_data), abs=1e-6)


def test_bad_configuration_fails_before_training(tmp_path):
    model = LitClassifier()
    with pytest.raises(ValueError, match="max_epochs"):
        _trainer(tmp_path, [IntraFusionCallback(0.5, start=5)], max_epochs=3).fit(model, datamodule=DigitsDataModule())
    from lightning_intrafusion.datasets import digits_tensors
    train, _ = digits_tensors()
    loader = torch.utils.data.DataLoader(train, batch_size=64)
    with pytest.raises(ValueError, match="validation data"):
        _trainer(tmp_path, [IntraFusionCallback(0.5, start=1)], max_epochs=3).fit(LitClassifier(), loader)
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01)
    with pytest.raises(RuntimeError, match="full-size copy"):
        _trainer(tmp_path, [IntraFusionCallback(0.5, start=1), swa], max_epochs=3).fit(LitClassifier(), datamodule=DigitsDataModule())


def test_mixed_precision_training_keeps_working(tmp_path):
    pl.seed_everything(0)
    model = LitClassifier()
    cb = IntraFusionCallback(target_sparsity=0.5, start=1, end=2, schedule="linear")
    trainer = _trainer(tmp_path, [cb], max_epochs=4, precision="bf16-mixed")
    trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.fired == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert trainer.callback_metrics["val_acc"] > 0.5


def test_step_unit_fires_between_optimizer_steps(tmp_path):
    pl.seed_everything(0)
    model = LitClassifier()
    cb = IntraFusionCallback(target_sparsity=0.4, unit="step", start=10, end=30, every=10, schedule="cubic")
    trainer = _trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.fired == 3
    assert [r["sparsity"] for r in cb.records] == pytest.approx([0.4 * (1 - (2 / 3) ** 3), 0.4 * (1 - (1 / 3) ** 3), 0.4])


def test_fit_with_a_compiled_submodule(tmp_path):
    """A torch.compile'd backbone is pruned through the module it wraps; Adam's state follows the
    kept channels (parameter names differ from the recorded ones by the wrapper's '_orig_mod')."""
    pl.seed_everything(0)
    model = LitClassifier(optimizer="adam", lr=1e-3, scheduler=False)
    model.net = torch.compile(model.net, backend="eager")
    dense_params = _params(model)
    cb = IntraFusionCallback(target_sparsity=0.5, start=1, end=2, every=1, schedule="linear")
    trainer = _trainer(tmp_path, [cb], max_epochs=3)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.fired == 2 and _params(model) < dense_params / 2
    assert type(model.net).__name__ == "OptimizedModule"
    opt = trainer.optimizers[0]
    assert {id(p) for p in opt.state} == {id(p) for p in model.parameters()}
    for p, state in opt.state.items():
        assert state["exp_avg"].shape == p.shape
