import json
import re

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelPruning
from torch.utils.data import DataLoader

from lpl.order import Recording, TrainOrderRecorder, quantities
from lpl.order.projection import Projector
from lpl.utils.errors import LplError

from recorder_support import TinyDataModule, TinyNet, trainer_kwargs


# recordings compared bitwise across runs: one thread, one summation order
pytestmark = pytest.mark.usefixtures("one_thread")


class ParamTrace(L.Callback):
    """theta_t at the start of every step, and theta_T at the end (a slow, obvious reference)."""

    def __init__(self):
        self.thetas = []

    def _flat(self, pl_module):
        return torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.thetas.append(self._flat(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.thetas.append(self._flat(pl_module))


def _fit(model, callbacks, max_steps=6, datamodule=None, **overrides):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(max_steps=max_steps, callbacks=callbacks, **overrides))
    trainer.fit(model, datamodule=datamodule or TinyDataModule())
    return trainer


def test_recording_reproduces_the_reference_updates(tmp_path):
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trace = ParamTrace()
    recorder = TrainOrderRecorder(tmp_path / "rec", proj_dim=32, seed=3, store_dtype="float32")
    _fit(model, [recorder, trace], max_steps=8)  # 6 batches per epoch: the run reshuffles into a second epoch
    rec = Recording.open(tmp_path / "rec")
    rec.verify()
    dm = TinyDataModule()
    dm.setup()
    sampler = dm.train_batch_sampler()
    planned = sampler.global_batches(0) + sampler.global_batches(1)[:2]
    assert rec.status == "complete" and rec.num_steps == 8 and rec.probe_steps == list(range(9))
    assert [rec.batches[b] for b in rec.order] == planned
    projector = Projector(trace.thetas[0].numel(), 32, seed=3)
    lrs = rec.scalars["lr"]
    assert lrs == pytest.approx([0.05 / (1 + 0.1 * t) for t in range(8)])
    for t in range(8):
        step = rec.step(t)
        assert step["update"].shape == (len(rec.batches), 32)
        # theta_{t+1} = theta_t - lr_t * Gamma(theta_t, B_t): the recorded update term of the batch trained at t
        expected = projector.project((trace.thetas[t] - trace.thetas[t + 1]) / lrs[t])
        torch.testing.assert_close(step["update"][rec.order[t]], expected, rtol=1e-3, atol=1e-4)
    final = rec.step(8)
    assert set(final) >= {"loss", "grad", "update", "precond_grad", "val_loss", "val_grad"}
    assert rec.probe_scalars["val_loss"][-1] == pytest.approx(float(final["val_loss"]))
    assert all(torch.equal(v, initial[k]) for k, v in rec.initial_state().items())
    manifest = rec.manifest
    assert manifest["model"]["class_path"].endswith("TinyNet") and manifest["model"]["hparams"]["lr"] == 0.05
    assert manifest["datamodule"]["class_path"].endswith("TinyDataModule")
    assert manifest["datamodule"]["hparams"]["batch_size"] == 8
    assert manifest["optimizer"] == {"name": "AdamW", "lr": 0.05, "betas": [0.9, 0.999], "eps": 1e-08,
                                     "weight_decay": 0.01, "decoupled": True}
    assert manifest["model"]["num_params"] == 6 * 8 + 8 + 8 * 3 + 3


def test_probes_leave_training_untouched(tmp_path):
    """Dropout draws from the RNG and probes run their own forwards: the trained weights must not change."""
    torch.manual_seed(1)
    plain = TinyNet(dropout=0.3)
    _fit(plain, [])
    torch.manual_seed(1)
    recorded = TinyNet(dropout=0.3)
    _fit(recorded, [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, probe_every_n_steps=2)])
    for (name, a), b in zip(plain.state_dict().items(), recorded.state_dict().values()):
        assert torch.equal(a, b), name
    assert recorded.training and all(m.training for m in recorded.modules())
    assert Recording.open(tmp_path / "rec").probe_steps == [0, 2, 4, 6]


def test_recorder_stores_whatever_the_quantities_return(tmp_path, monkeypatch):
    seen_steps = []

    def fake_pool(ctx, batch_loss):
        seen_steps.append(ctx.step)
        return {"double_loss": 2 * batch_loss().detach(), "adam_step": torch.full((3,), float(ctx.adam.step))}

    monkeypatch.setattr(quantities, "probe_pool_batches", lambda ctx, losses: [fake_pool(ctx, f) for f in losses])
    monkeypatch.setattr(quantities, "probe_validation", lambda ctx, val_loss: {"v": val_loss().detach()})
    _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, probe_every_n_steps=3)])
    rec = Recording.open(tmp_path / "rec")
    assert rec.probe_steps == [0, 3, 6] and seen_steps == [0] * 6 + [3] * 6 + [6] * 6
    step = rec.step(3)
    assert set(step) == {"double_loss", "adam_step", "v"}
    assert torch.equal(step["adam_step"].float(), torch.full((6, 3), 3.0))
    assert rec.probe_scalars["v"] == [pytest.approx(float(rec.step(t)["v"])) for t in (0, 3, 6)]


class Snapshot(L.Callback):
    """Placed before and after the recorder: what a probe must leave exactly as it found it."""

    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizers[0].state.items()}
        self.states.append((
            [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
            [m.training for m in pl_module.modules()],
            torch.get_rng_state(),
            optimizer_state,
        ))


def test_probe_restores_grads_modes_rng_and_leaves_the_optimizer_alone(tmp_path, monkeypatch):
    def meddling_probe(ctx, batch_loss):  # everything a careless probe could disturb
        for p in ctx.params:
            p.grad = torch.full_like(p, 7.0)
        torch.rand(100)
        return {"loss": batch_loss().detach()}

    monkeypatch.setattr(quantities, "probe_pool_batches", lambda ctx, losses: [meddling_probe(ctx, f) for f in losses])
    before, after = Snapshot(), Snapshot()
    recorder = TrainOrderRecorder(tmp_path / "rec", proj_dim=8)
    _fit(TinyNet(dropout=0.5), [before, recorder, after], max_steps=4)
    assert len(before.states) == len(after.states) == 4
    for (grads_a, modes_a, rng_a, opt_a), (grads_b, modes_b, rng_b, opt_b) in zip(before.states, after.states):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_a, grads_b))
        assert modes_a == modes_b and all(modes_b)
        assert torch.equal(rng_a, rng_b)
        assert opt_a.keys() == opt_b.keys()
        assert all(torch.equal(v, opt_b[p][k]) for p, s in opt_a.items() for k, v in s.items())


# ---- bad input
def test_refuses_optimizer_that_is_not_adam(tmp_path):
    with pytest.raises(LplError, match="optimizer is SGD"):
        _fit(TinyNet(optimizer="sgd"), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)])


class SeenRankAndWorld(L.Callback):
    def on_train_start(self, trainer, pl_module):
        from lpl.utils.trainer import rank_and_world

        self.seen = rank_and_world()


def test_a_one_device_fit_under_a_leftover_process_group_is_one_process_until_it_ends(tmp_path, monkeypatch):
    # a 2-rank group a DDP fit left initialised (faked: one process cannot hold a real one of 2; the real one is in
    # test_recorder_ddp.py); the view must also end when the fit fails, where Lightning calls no teardown hook
    import torch.distributed as dist

    from lpl.utils.trainer import rank_and_world

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    seen = SeenRankAndWorld()
    with pytest.raises(LplError, match="optimizer is SGD"):
        _fit(TinyNet(optimizer="sgd"), [seen, TrainOrderRecorder(tmp_path / "rec", proj_dim=8)])
    assert seen.seen == (0, 1) and rank_and_world() == (0, 2)


def test_refuses_gradient_accumulation(tmp_path):
    with pytest.raises(LplError, match="accumulate_grad_batches=1"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], accumulate_grad_batches=2)


class BiasesWithTheirOwnLr(TinyNet):
    def configure_optimizers(self):
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        weights = [p for n, p in self.named_parameters() if not n.endswith("bias")]
        return torch.optim.AdamW([{"params": weights}, {"params": biases, "lr": 0.01}], lr=0.05)


def test_refuses_param_groups_with_different_learning_rates(tmp_path):
    # (groups that differ in weight decay only are recorded: tests/order/test_training_modes.py)
    with pytest.raises(LplError, match=r"differ in lr \(\[0.05, 0.01\]\)"):
        _fit(BiasesWithTheirOwnLr(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)])


def test_refuses_gradient_clipping(tmp_path):
    with pytest.raises(LplError, match="gradient clipping"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], gradient_clip_val=1.0)
    assert not (tmp_path / "rec" / "manifest.json").exists()


class WarmAdam(TinyNet):
    """Adam loaded with an earlier run's moments before the first step (a manual optimizer-state load)."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        for p in self.parameters():
            config["optimizer"].state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.ones_like(p),
                                            "exp_avg_sq": torch.ones_like(p)}
        return config


def test_refuses_an_optimizer_with_earlier_moments(tmp_path):
    with pytest.raises(LplError, match="already holds Adam state"):
        _fit(WarmAdam(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)])
    assert not (tmp_path / "rec" / "manifest.json").exists()


class TwoOptimizers(TinyNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        self.manual_backward(self.loss(batch))
        first.step()
        second.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[0].parameters()), torch.optim.Adam(self.net[3].parameters())]


def test_refuses_several_optimizers(tmp_path):
    with pytest.raises(LplError, match="exactly one optimizer"):
        _fit(TwoOptimizers(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)])


class NoIndexDataModule(TinyDataModule):
    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.collate_fn = lambda items: {k: torch.stack([i[k] for i in items]) for k in ("x", "y")}
        return loader


def test_refuses_batches_without_index(tmp_path):
    with pytest.raises(LplError, match="'index' entry"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], datamodule=NoIndexDataModule())


class ShuffledDataModule(TinyDataModule):
    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8, shuffle=True)


def test_refuses_a_loader_whose_order_is_not_reproducible(tmp_path):
    # with the rest a user's own data needs, so that one message lists it all
    with pytest.raises(LplError, match="order is not reproducible.*dict batches whose 'index'.*takes `batches` and "
                                       "`order`.*IndexedDataModule"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], datamodule=ShuffledDataModule())


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return (self.dataset[i] for i in range(len(self.dataset)))


class StreamedDataModule(TinyDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(self.train_set), batch_size=8)


def test_refuses_an_iterable_dataset_as_a_loader_whose_order_is_not_reproducible(tmp_path):
    with pytest.raises(LplError, match=r"order is not reproducible \(an IterableDataset, Stream\)"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], datamodule=StreamedDataModule())


class TwoValidationLoaders(TinyDataModule):
    def val_dataloader(self):
        return [super().val_dataloader(), super().val_dataloader()]


class NamedValidationLoaders(TinyDataModule):
    def val_dataloader(self):
        return {"a": super().val_dataloader(), "b": super().val_dataloader()}


@pytest.mark.parametrize("datamodule, kind", [(TwoValidationLoaders, "list"), (NamedValidationLoaders, "dict")])
def test_refuses_several_validation_loaders_before_writing_anything(tmp_path, datamodule, kind):
    with pytest.raises(LplError, match=f"one validation loader.*a {kind} of 2"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], datamodule=datamodule())
    assert not (tmp_path / "rec").exists()


class ValidationLoaderInAList(TinyDataModule):
    def val_dataloader(self):
        return [super().val_dataloader()]


class ValidationLoaderInATuple(TinyDataModule):
    def val_dataloader(self):
        return (super().val_dataloader(),)


@pytest.mark.parametrize("datamodule", [ValidationLoaderInAList, ValidationLoaderInATuple])
def test_a_validation_loader_alone_in_a_list_or_tuple_is_that_loader(tmp_path, datamodule):
    from lpl.order import record_sensitivities, retrain

    for name, data in (("plain", TinyDataModule()), ("wrapped", datamodule())):
        L.seed_everything(0, verbose=False)
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / name, proj_dim=8)], max_steps=3, datamodule=data)
    plain, wrapped = Recording.open(tmp_path / "plain"), Recording.open(tmp_path / "wrapped")
    assert wrapped.status == "complete" and wrapped.probe_scalars["val_loss"] == plain.probe_scalars["val_loss"]
    # retraining and the sensitivity data's re-run measure it through the rebuilt datamodule's container too
    final = wrapped.probe_scalars["val_loss"][-1]
    assert retrain(tmp_path / "wrapped", wrapped.order, accelerator="cpu").final_loss == pytest.approx(final, rel=1e-5)
    record_sensitivities(tmp_path / "wrapped", curvature_rank=0, hessian_rank=0, accelerator="cpu", check_orders=0,
                         verbose=False)
    rerun = Recording.open(tmp_path / "wrapped").manifest["sensitivity"]["rerun_val_loss"]
    assert rerun == pytest.approx(final, rel=1e-5)


class WithActivation(TinyNet):
    def __init__(self, activation=None, scale=1.0):
        super().__init__()
        self.save_hyperparameters()


def test_hyperparameters_json_cannot_hold_are_flagged_when_recording_starts(tmp_path):
    with pytest.warns(UserWarning, match=r"WithActivation hyperparameters \['activation', 'scale'\] cannot be stored "
                                         r"as JSON.*retrain, record_sensitivities .* will refuse"):
        _fit(WithActivation(torch.nn.ReLU(), torch.tensor(2.0)), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)],
             max_steps=1)


def test_refuses_another_recording_unless_resume_and_then_checks_it_matches(tmp_path):
    _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], max_steps=2)
    with pytest.raises(LplError, match="already holds a recording.*resume=True"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], max_steps=2)
    with pytest.raises(LplError, match="projection.seed"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, seed=1, resume=True)], max_steps=2)
    with pytest.raises(LplError, match="projection.proj_dim"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=16, resume=True)], max_steps=2)
    wider = TinyNet()
    wider.net[3] = torch.nn.Linear(8, 4)
    with pytest.raises(LplError, match="model.param_hash"):
        _fit(wider, [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, resume=True)], max_steps=2)
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert manifest["status"] == "complete"  # a refused resume leaves the recording as it was


def test_validation_curvature_is_recorded_once_at_the_end_and_used_by_the_estimator(tmp_path):
    from lpl.order import OrderEstimator

    _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=16, probe_every_n_steps=2, val_curvature_rank=3)])
    recording = Recording.open(tmp_path / "rec")
    assert "val_curv_basis" not in recording.step(0) and "val_curv_basis" not in recording.step(4)
    final = recording.step(6)
    assert final["val_curv_basis"].shape == (3, 16) and final["val_curv_matrix"].shape == (3, 3)
    order = list(reversed(range(6)))
    quadratic = OrderEstimator.from_recording(tmp_path / "rec", method="zeroth_order").estimate(order)
    linear = OrderEstimator.from_recording(tmp_path / "rec", method="zeroth_order", quadratic=False).estimate(order)
    torch.testing.assert_close(quadratic.loss_curve[:-1], linear.loss_curve[:-1])  # only the final point changes
    assert quadratic.final_loss != linear.final_loss


def test_bad_arguments():
    with pytest.raises(LplError, match="val_curvature_rank"):
        TrainOrderRecorder("x", val_curvature_rank=-1)
    with pytest.raises(LplError, match="probe_every_n_steps"):
        TrainOrderRecorder("x", probe_every_n_steps=0)
    # a float proj_dim recorded the whole run, then the recording could not be opened ("damaged or edited")
    for name, value in (("proj_dim", 8.5), ("proj_dim", True), ("probe_every_n_steps", 1.5), ("seed", -1),
                        ("curvature_rank", 2.0)):
        with pytest.raises(LplError, match=f"{name} must be an int >= "):
            TrainOrderRecorder("x", **{name: value})
    assert TrainOrderRecorder("x", proj_dim=np.int64(16)).proj_dim == 16
    with pytest.raises(LplError, match="store_dtype"):
        TrainOrderRecorder("x", store_dtype="int8")


def test_resume_without_checkpoint_restarts_the_recording_with_this_runs_weights(tmp_path):
    _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, probe_every_n_steps=2)], max_steps=4)
    torch.manual_seed(123)
    model = TinyNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model, [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, probe_every_n_steps=2, resume=True)], max_steps=4)
    rec = Recording.open(tmp_path / "rec")
    rec.verify()
    assert rec.status == "complete" and rec.recorded_steps == 4 and rec.probe_steps == [0, 2, 4]
    assert all(torch.equal(v, initial[k]) for k, v in rec.initial_state().items())


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_run_stopped_early_warns_and_its_recording_is_refused_clearly(tmp_path):
    from lpl.order import OrderEstimator

    with pytest.warns(UserWarning, match="stopped at step 3 of the 6"):
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, curvature_rank=0), StopAt(3)])
    with pytest.raises(LplError, match=re.escape(f"recording {tmp_path / 'rec'} has no final probe at step 6")):
        OrderEstimator.from_recording(tmp_path / "rec", method="zeroth_order")


class NoisyDataModule(TinyDataModule):
    """Random augmentation in the dataset: the same sample id gives other data each time it is loaded."""

    def build_datasets(self):
        train, val = super().build_datasets()

        class Noisy(type(train)):
            def __getitem__(self, i):
                item = super().__getitem__(i)
                return {**item, "x": item["x"] + 0.1 * torch.randn_like(item["x"])}

        noisy = Noisy.__new__(Noisy)
        noisy.__dict__.update(train.__dict__)
        return noisy, val


def test_a_dataset_with_random_augmentation_is_flagged_without_moving_training_rngs(tmp_path):
    torch.manual_seed(1)
    plain = TinyNet()
    _fit(plain, [], datamodule=NoisyDataModule())
    torch.manual_seed(1)
    recorded = TinyNet()
    with pytest.warns(UserWarning, match="loading the samples of step 0 again gave other x"):
        _fit(recorded, [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, curvature_rank=0)],
             datamodule=NoisyDataModule())
    for (name, a), b in zip(plain.state_dict().items(), recorded.state_dict().values()):
        assert torch.equal(a, b), name  # the check and the probes load samples without moving training's RNG


def test_deterministic_data_pass_the_repeat_check_silently(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "rec", proj_dim=8, curvature_rank=0)], max_steps=2)
    assert not [w for w in caught if "loading the samples" in str(w.message)]


# ---- what other callbacks and hooks do to a recorded run
class ClampWeights(L.Callback):
    """A max-norm style constraint on the weights, applied outside the optimizer after each step or at the end."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    @torch.no_grad()
    def _clamp(self, pl_module):
        for p in pl_module.parameters():
            p.clamp_(-0.1, 0.1)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.hook == "batch_end":
            self._clamp(pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.hook == "train_end":
            self._clamp(pl_module)


@pytest.mark.parametrize("hook, step", [("batch_end", 1), ("train_end", 4)])
def test_weights_written_outside_the_optimizer_are_refused_and_the_steps_before_kept(tmp_path, hook, step):
    recorder = TrainOrderRecorder(tmp_path / "rec", proj_dim=8, curvature_rank=0)
    with pytest.raises(LplError, match=rf"parameters 'net.0.weight', 'net.0.bias', 'net.3.weight' and 1 more were "
                                       rf"written in place before step {step}, outside the optimizer"):
        _fit(TinyNet(), [ClampWeights(hook), recorder], max_steps=4)  # the clamp's on_train_end runs first
    rec = Recording.open(tmp_path / "rec")
    rec.verify()
    assert rec.status == "recording" and rec.recorded_steps == step  # train_end: every step, no final probe


def test_pruning_during_a_recorded_run_is_refused_at_the_step_after_it(tmp_path):
    recorder = TrainOrderRecorder(tmp_path / "rec", proj_dim=8, probe_every_n_steps=3, curvature_rank=0)
    pruning = ModelPruning("l1_unstructured", amount=0.3, verbose=0)  # prunes when the first epoch (6 steps) ends
    with pytest.raises(LplError, match=r"parameters changed before step 6 \(without 'net.0.weight'.*with "
                                       r"'net.0.weight_orig'.*\): torch.nn.utils.prune"):
        _fit(TinyNet(), [recorder, pruning], max_steps=8)
    assert Recording.open(tmp_path / "rec").recorded_steps == 6


class UnfreezesAtStep3(TinyNet):
    """The first layer frozen for the first steps (a fine-tuning warm-up), unfrozen by the module's own hook, which
    runs after the recorder's."""

    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            self.net[0].requires_grad_(True)


class FreezesAfterStep2(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 3:
            pl_module.net[0].requires_grad_(False)


@pytest.mark.parametrize("model, callbacks, change", [(UnfreezesAtStep3, [], "became trainable"),
                                                     (TinyNet, [FreezesAfterStep2()], "was frozen")],
                         ids=["unfrozen-by-the-module", "frozen-by-a-callback"])
def test_changing_which_parameters_train_is_refused_at_that_step_and_the_steps_before_kept(tmp_path, model, callbacks,
                                                                                           change):
    # probes every 10 steps: only the failure's flush can put steps 1 and 2 into the manifest
    recorder = TrainOrderRecorder(tmp_path / "rec", proj_dim=8, probe_every_n_steps=10, curvature_rank=0)
    with pytest.raises(LplError, match=rf"parameter 'net.0.weight' {change} at step 3; changing which parameters "
                                       "train during a recorded run is not supported"):
        _fit(model(), [*callbacks, recorder])
    rec = Recording.open(tmp_path / "rec")
    rec.verify()
    assert rec.status == "recording" and rec.recorded_steps == 3 and rec.probe_steps == [0]


class FailsAtTheFirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise RuntimeError("first batch")


@pytest.mark.parametrize("callbacks, overrides, name", [
    ([EarlyStopping(monitor="val_loss")], {}, r"EarlyStopping\(monitor='val_loss'\)"),
    ([], {"max_time": {"minutes": 5}}, "max_time"),
], ids=["early_stopping", "max_time"])
def test_what_may_stop_the_run_before_its_planned_steps_is_warned_about_before_the_first_step(
        tmp_path, callbacks, overrides, name):
    with pytest.warns(UserWarning, match=rf"{name} may stop training before the T = 6 steps the recording plans"), \
            pytest.raises(RuntimeError, match="first batch"):
        _fit(TinyNet(), [*callbacks, TrainOrderRecorder(tmp_path / "rec", proj_dim=8), FailsAtTheFirstBatch()],
             **overrides)


class TupleBatches(TinyDataModule):
    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.collate_fn = lambda items: tuple(torch.stack([i[k] for i in items]) for k in ("x", "y", "index"))
        return loader


def test_a_fit_refused_before_its_first_step_leaves_no_recording_and_what_was_there(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("the user's own")
    for path in (tmp_path / "new" / "rec", kept):
        with pytest.raises(LplError, match="dict batches with an 'index' entry"):
            _fit(TinyNet(), [TrainOrderRecorder(path, proj_dim=8)], datamodule=TupleBatches())
    assert not (tmp_path / "new" / "rec").exists()
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    _fit(TinyNet(), [TrainOrderRecorder(kept, proj_dim=8)], max_steps=2)  # the data fixed, the next fit records there
    assert Recording.open(kept).status == "complete"


def test_weight_averaging_listed_before_the_recorder_is_refused(tmp_path):
    """It writes the average in (through .data, unseen by the parameter checks) before the recorder's final probe."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    with pytest.raises(LplError, match="EMAWeightAveraging is listed before TrainOrderRecorder"):
        _fit(TinyNet(), [EMAWeightAveraging(), TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], max_steps=2)
    _fit(TinyNet(), [TrainOrderRecorder(tmp_path / "after", proj_dim=8), EMAWeightAveraging()], max_steps=2)
    assert Recording.open(tmp_path / "after").status == "complete"


class MetricsInConfigureModel(TinyNet):
    """torchmetrics made in configure_model, which Lightning runs after the callbacks' setup."""

    def configure_model(self) -> None:
        import torchmetrics

        if not hasattr(self, "accuracy"):
            self.accuracy = torchmetrics.MeanMetric()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.synced_at_fit = self.accuracy.sync_on_compute


def test_metrics_made_in_configure_model_do_not_sync_under_a_leftover_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    model = MetricsInConfigureModel()
    _fit(model, [TrainOrderRecorder(tmp_path / "rec", proj_dim=8)], max_steps=2)
    assert model.synced_at_fit is False and model.accuracy.sync_on_compute is True  # restored after the fit
