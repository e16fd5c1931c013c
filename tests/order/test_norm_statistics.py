"""BatchNorm running statistics as order-dependent state: the recorded pieces rebuild BatchNorm's own updates, the
loss is differentiable in them, and the full-space estimates follow the order's statistics."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

from lpl.order import OrderEstimator, Recording, retrain
from lpl.order.adjoint import record_sensitivities
from lpl.order.norm_statistics import (
    BatchStatistics, differentiable_running_statistics, final_weights, load_running_statistics, running_statistics,
    step_momenta, tracked_norms,
)
from test_estimator_task import TinyClassifier, record


class FastNorms(TinyClassifier):
    """BatchNorm with momentum 0.5: the last few batches set its running statistics."""

    def __init__(self, norm: bool = True, **kwargs) -> None:
        super().__init__(norm=True, **kwargs)
        self.net[1].momentum = 0.5


class SharedNorm(TinyClassifier):
    """One BatchNorm applied twice per forward."""

    def __init__(self, norm: bool = True, **kwargs) -> None:
        super().__init__(norm=True, **kwargs)
        self.net = nn.Sequential(nn.Linear(64, 16), self.net[1], nn.Tanh(), nn.Linear(16, 16), self.net[1],
                                 nn.Tanh(), nn.Linear(16, 10))


class SpareNorm(TinyClassifier):
    """A BatchNorm the forward never uses (a spare head, say) beside one it does."""

    def __init__(self, norm: bool = True, **kwargs) -> None:
        super().__init__(norm=True, **kwargs)
        self.spare = nn.BatchNorm1d(4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5),
                         nn.BatchNorm1d(5, momentum=None), nn.Tanh(), nn.Linear(5, 2), nn.BatchNorm1d(2, affine=False),
                         nn.BatchNorm1d(2, track_running_stats=False)).double()


def test_recorded_statistics_and_weights_rebuild_batchnorms_updates():
    model = _model()
    assert len(tracked_norms(model)) == 3  # the layer without running statistics is not one
    initial = running_statistics(model).double()
    momenta, stats = [], []
    with BatchStatistics(model) as statistics:
        for step in range(4):
            momenta.append(step_momenta(model).double())
            model(torch.randn(6, 2, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(step)))
            stats.append(statistics.take().double())
    momenta = torch.stack(momenta)
    # the cumulative-average layer weighs step t by 1 / (t + 1); the others by their momentum
    expected = torch.tensor([[1 / (t + 1)] * 10 for t in range(4)], dtype=torch.double)
    torch.testing.assert_close(momenta[:, 6:16], expected)
    torch.testing.assert_close(momenta[:, :6], torch.full((4, 6), 0.1, dtype=torch.double))
    weights = final_weights(momenta)
    rebuilt = initial * torch.prod(1 - momenta, 0) + (weights * torch.stack(stats)).sum(0)
    torch.testing.assert_close(rebuilt, running_statistics(model).double(), rtol=1e-5, atol=1e-6)


def test_a_layer_frozen_in_eval_mode_during_training_contributes_nothing():
    model = _model()
    model[1].eval()  # fine-tuning often freezes BatchNorm: its statistics stay as loaded
    before = running_statistics(model)
    with BatchStatistics(model) as statistics:
        momenta = step_momenta(model)
        model(torch.randn(6, 2, 4, 4, dtype=torch.double))
        stats = statistics.take()
    assert (momenta[:6] == 0).all() and (stats[:6] == 0).all() and (momenta[6:] > 0).all()
    torch.testing.assert_close(running_statistics(model)[:6], before[:6], rtol=0, atol=0)


def test_layers_that_do_not_run_once_per_forward_are_reported():
    model = nn.Module()
    model.twice, model.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with BatchStatistics(model) as statistics:
        model.twice(model.twice(torch.randn(5, 3)))  # two running-statistics updates in one step
        statistics.take()
    assert statistics.irregular() == {"twice"} and statistics.never_called() == {"unused"}
    with BatchStatistics(model) as statistics:  # "unused" run in one forward only: updated in some steps only
        model.twice(torch.randn(5, 3))
        statistics.take()
        model.unused(model.twice(torch.randn(5, 3)))
        statistics.take()
    assert statistics.irregular() == {"unused"} and statistics.never_called() == set()


def test_record_sensitivities_warns_and_keeps_the_reference_statistics_for_a_layer_called_twice(tmp_path):
    path = record(tmp_path / "shared", proj_dim=64, curvature_rank=0, model=SharedNorm())
    with pytest.warns(UserWarning, match=r"BatchNorm layer\(s\) \['net.1'\] do not run exactly once"):
        record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    assert OrderEstimator.from_recording(path, method="linearized").data.linearized.norm_stats is None


def test_a_layer_no_forward_runs_is_modelled_as_never_updated(tmp_path):
    # its unused parameters have gradients without a graph: the recorder's curvature probes and the sensitivity
    # data's Hessian-vector products skip them (they raised before)
    path = record(tmp_path / "spare", proj_dim=64, curvature_rank=2, model=SpareNorm())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="BatchNorm layer")
        # BatchNorm's step counters count the same steps in every order: no warning about changed buffers
        warnings.filterwarnings("error", message="training changed the buffers")
        record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    run = OrderEstimator.from_recording(path, method="linearized").data.linearized
    assert (run.norm_momenta[:, 32:] == 0).all() and (run.norm_momenta[:, :32] > 0).all()  # net.1 first, spare last


def _model_with_activation_inside() -> nn.Module:
    """timm's BatchNormAct2d applies its activation inside the BatchNorm module's forward."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    norm = BatchNormAct2d(3, act_layer=nn.SiLU)
    norm.running_mean.uniform_(-1.0, 1.0)
    norm.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.Flatten(), nn.Linear(12, 2)).double()


@pytest.mark.parametrize("make_model", [_model, _model_with_activation_inside], ids=["torch", "timm_norm_act"])
def test_the_eval_loss_is_differentiable_in_the_running_statistics(make_model):
    model = make_model().eval()
    x = torch.randn(7, 2, 4, 4, dtype=torch.double)
    flat = running_statistics(model).double().requires_grad_()
    with differentiable_running_statistics(model, flat):
        out = model(x)
    torch.testing.assert_close(out, model(x))
    (gradient,) = torch.autograd.grad(out.square().sum(), flat)
    numeric = torch.zeros_like(gradient)
    for i in range(len(flat)):
        shifted = flat.detach().clone()
        for sign in (1, -1):
            shifted[i] += sign * 1e-6
            load_running_statistics(model, shifted)
            numeric[i] += sign * model(x).square().sum() / 2e-6
            shifted[i] -= sign * 1e-6
    torch.testing.assert_close(gradient, numeric, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def frozen_weights_recording(tmp_path_factory):
    """BatchNorm model trained at lr 0: the weights never move, so the order acts through the running statistics
    alone."""
    torch.manual_seed(0)  # record() seeds after the model is built
    path = record(tmp_path_factory.mktemp("order") / "frozen", proj_dim=64, curvature_rank=0, model=FastNorms(lr=0.0))
    record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    return path


@pytest.mark.parametrize("method", ["linearized", "adjoint"])
def test_estimates_follow_the_orders_running_statistics(frozen_weights_recording, method):
    path = frozen_weights_recording
    reference = torch.tensor(Recording.open(path).order)
    generator = torch.Generator().manual_seed(0)
    orders = [reference.flip(0)] + [reference[torch.randperm(len(reference), generator=generator)] for _ in range(2)]
    estimator = OrderEstimator.from_recording(path, method=method)
    truths = [retrain(path, order.tolist(), batch_losses=True) for order in orders]
    estimates = [estimator.estimate(order.tolist()) for order in orders]
    change = torch.tensor([t.final_loss - estimator.reference_loss for t in truths])
    estimated_change = torch.tensor([e.final_loss - estimator.reference_loss for e in estimates])
    assert change.abs().mean() > 5e-4  # the order matters, through the statistics only
    # the statistics are rebuilt exactly and the final loss reads them off to second order (a scratch check over 5
    # initialisations: errors 1-4% of the change; to first order only, 30-300%); without them the error is the change
    assert (estimated_change - change).abs().mean() < 0.2 * change.abs().mean()
    if method == "linearized":
        reference_batches = estimator.estimate(reference.tolist()).batch_losses.double()
        batch_change = torch.stack([t.batch_losses - reference_batches for t in truths])
        batch_error = torch.stack([e.batch_losses.double() - t.batch_losses for e, t in zip(estimates, truths)])
        # the batch losses read the statistics off to first order only
        assert batch_error.abs().mean() < 0.5 * batch_change.abs().mean()


def test_adjoint_tables_alone_carry_the_statistics(frozen_weights_recording, tmp_path):
    """Built without the linearised replay's data (hessian_rank=0), the tables hold the same statistics terms."""
    path = shutil.copytree(frozen_weights_recording, tmp_path / "rec")
    record_sensitivities(path, curvature_rank=0, hessian_rank=0, accelerator="cpu", check_orders=0, verbose=False)
    order = list(reversed(Recording.open(path).order))
    alone = OrderEstimator.from_recording(path, method="adjoint").estimate(order).final_loss
    beside = OrderEstimator.from_recording(frozen_weights_recording, method="adjoint").estimate(order).final_loss
    assert alone == pytest.approx(beside, abs=1e-6)
    assert alone != pytest.approx(OrderEstimator.from_recording(path, method="adjoint").reference_loss, abs=1e-4)


def test_loss_curves_use_each_steps_running_statistics(tmp_path):
    """The reference order's estimated curve is the recorded one at every step (validation before step s normalises
    with step s's running statistics, not the final ones)."""
    path = record(tmp_path / "noisy", proj_dim=64, curvature_rank=0, dropout=0.3, norm=True)
    record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    rec = Recording.open(path)
    curve = OrderEstimator.from_recording(path, method="linearized").estimate(rec.order).loss_curve
    torch.testing.assert_close(curve.double(), torch.tensor(rec.probe_scalars["val_loss"], dtype=torch.double),
                               atol=2e-4, rtol=0)


def test_without_batchnorm_nothing_is_stored(tmp_path):
    path = record(tmp_path / "plain", proj_dim=64, curvature_rank=0)
    record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    run = OrderEstimator.from_recording(path, method="linearized").data.linearized
    assert all(getattr(run, name) is None for name in ("norm_stats", "norm_momenta", "val_norm_grads",
                                                        "pool_norm_grads"))
