"""check_methods and `lpl check-methods`: every method scored against truly retrained orders."""

from __future__ import annotations

import json

import pytest
import torch
import wandb
from scipy.stats import pearsonr, spearmanr

from lpl.order import OrderEstimator, Recording, retrain
from lpl.order.checking import check_methods
from lpl.order.commands import check_methods_main, estimate_main, read_orders
from lpl.order.estimator import agreement
from lpl.utils.errors import LplError
from test_estimator_task import NUM_BATCHES, TinyClassifier, record


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("check") / "rec", lr=0.003, proj_dim=256, curvature_rank=0)


def _orders(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(NUM_BATCHES, generator=generator) for _ in range(count)])


def test_agreement_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        true = torch.randn(9, generator=generator, dtype=torch.float64)
        estimated = (true + torch.randn(9, generator=generator, dtype=torch.float64)).round(decimals=trial % 3 - 1)
        metrics = agreement(estimated, true.tolist())
        assert metrics["spearman"] == pytest.approx(spearmanr(estimated, true)[0], abs=1e-9, nan_ok=True)
        assert metrics["pearson"] == pytest.approx(pearsonr(estimated, true)[0], abs=1e-6, nan_ok=True)
        assert metrics["mae"] == pytest.approx(float((estimated - true).abs().mean()))


def test_scores_every_method_with_data_and_says_why_others_are_skipped(recording):
    orders = _orders(4)
    truth = [retrain(recording, order.tolist(), curve_every_n_steps=NUM_BATCHES, accelerator="cpu").final_loss
             for order in orders]
    check = check_methods(recording, orders)  # retrains the orders itself
    assert check.true_losses == pytest.approx(truth, abs=1e-6)
    assert set(check.scores) == {"zeroth_order", "adam"}  # no curvature factors, no sensitivity data
    assert "curvature_rank" in check.skipped["first_order"] and "record_sensitivities" in check.skipped["linearized"]
    for method, score in check.scores.items():
        estimates = OrderEstimator.from_recording(recording, method=method).estimate_many(orders).final_loss
        assert score.estimates == pytest.approx(estimates.double().tolist())
        assert score.mae == pytest.approx(float((estimates.double() - torch.tensor(truth)).abs().mean()), rel=1e-6)
    no_change = sum(abs(t - check.reference_loss) for t in truth) / len(truth)
    assert check.no_change_mae == pytest.approx(no_change)
    better = [m for m, s in check.scores.items() if s.mae < no_change]
    assert check.best == (min(better, key=lambda m: check.scores[m].mae) if better else None)


def test_given_true_losses_skip_retraining_and_bad_input_is_refused(recording):
    orders = _orders(3, seed=1)
    check = check_methods(recording, orders, ["adam"], true_losses=[1.0, 2.0, 3.0])
    assert check.true_losses == [1.0, 2.0, 3.0] and list(check.scores) == ["adam"]
    with pytest.raises(LplError, match="at least 3 orders"):
        check_methods(recording, orders[:2], true_losses=[1.0, 2.0])
    with pytest.raises(LplError, match="unknown method"):
        check_methods(recording, orders, ["adamw"], true_losses=[1.0, 2.0, 3.0])
    with pytest.raises(LplError, match="2 values for 3 orders"):
        check_methods(recording, orders, true_losses=[1.0, 2.0])
    with pytest.raises(LplError, match="batch id 99"):
        check_methods(recording, [[99] * 3] * 3, true_losses=[1.0, 2.0, 3.0])


def test_command_writes_json_csv_plot_and_wandb_scatter(recording, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()  # a run an earlier test left open would take these logs (WandbLogger reuses it)
    assert check_methods_main(["--recording", str(recording), "--orders", "random:3", "--methods", "zeroth_order,adam",
                               "--out", str(tmp_path), "--wandb", "lpl-tests"]) == 0
    written = json.loads((tmp_path / "check.json").read_text())
    assert len(written["true_losses"]) == 3 and set(written["scores"]) == {"zeroth_order", "adam"}
    assert (tmp_path / "check.csv").read_text().splitlines()[0] == "method,spearman,pearson,mae,mae_over_no_change"
    assert (tmp_path / "check.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "3 retrained orders" in printed and "zeroth_order" in printed
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/table/check/adam/estimated_vs_true*.json"))
    summary = list(tmp_path.glob("wandb/offline-run-*/files/media/table/check/summary*.json"))
    assert summary and [row[0] for row in json.loads(summary[0].read_text())["data"]][-1] == "no change"


def test_an_accelerator_the_machine_lacks_is_one_clear_error(recording):
    with pytest.raises(LplError, match="accelerator='tpu'"):
        retrain(recording, list(range(NUM_BATCHES)), accelerator="tpu")


def test_command_reuses_an_earlier_check_without_retraining(recording, tmp_path, monkeypatch, capsys):
    check_methods_main(["--recording", str(recording), "--orders", "random:3", "--methods", "adam",
                        "--out", str(tmp_path / "first")])
    first = json.loads((tmp_path / "first" / "check.json").read_text())
    monkeypatch.setattr("lpl.order.retraining.retrain", lambda *a, **k: pytest.fail("retrained"))
    check_methods_main(["--recording", str(recording), "--reuse", str(tmp_path / "first" / "check.json"),
                        "--methods", "adam,zeroth_order", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "check.json").read_text())
    assert again["orders"] == first["orders"] and again["true_losses"] == first["true_losses"]
    assert again["scores"]["adam"] == first["scores"]["adam"] and "zeroth_order" in again["scores"]
    other = dict(first, reference_loss=first["reference_loss"] + 1.0)
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(LplError, match="made for another recording"):
        check_methods_main(["--recording", str(recording), "--reuse", str(tmp_path / "other.json"),
                            "--out", str(tmp_path)])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LplError, match="not a check.json"):
        check_methods_main(["--recording", str(recording), "--reuse", str(tmp_path / "broken.json"),
                            "--out", str(tmp_path)])
    with pytest.raises(LplError, match="drop --orders"):  # it would be ignored
        check_methods_main(["--recording", str(recording), "--reuse", str(tmp_path / "first" / "check.json"),
                            "--orders", "random:5", "--out", str(tmp_path)])
    with pytest.raises(LplError, match="names no method"):  # it retrained, then judged no method at all
        check_methods_main(["--recording", str(recording), "--methods", ",", "--out", str(tmp_path)])
    capsys.readouterr()
    check_methods_main(["--recording", str(recording), "--reuse", str(tmp_path / "first" / "check.json"),
                        "--methods", "linearized", "--out", str(tmp_path / "none")])  # no sensitivity data here
    out = capsys.readouterr().out
    assert "no method could be scored" in out and "beats 'no change'" not in out


@pytest.mark.parametrize("content, match", [
    ("[[0, 1, 2]]", r"holds a JSON list, not an object"),
    ('{"recording": "rec", "method": "adam", "estimates": []}', "it has no orders, true_losses, reference_loss"),
    ('{"orders": [[0, 1, 2]], "true_losses": [null], "reference_loss": 1.0}', "true_losses and reference_loss are "
                                                                             "not numbers"),
    ('{"orders": [[0, 1], [2]], "true_losses": [1.0, 2.0], "reference_loss": 1.0}', "its orders: .*one length"),
    ('{"orders": [0, 1, 2], "true_losses": [1.0], "reference_loss": 1.0}', "its orders are not a list of orders"),
    ("{", r"not valid JSON: Expecting property name .* at line 1, column 2"),
])
def test_reuse_of_a_file_that_is_no_check_says_so(recording, tmp_path, content, match):
    (tmp_path / "earlier.json").write_text(content)
    with pytest.raises(LplError, match=f"earlier.json is not a check.json written by `lpl check-methods` .*{match}.*"
                                       "pass the check.json in the --out folder") as error:
        check_methods_main(["--recording", str(recording), "--reuse", str(tmp_path / "earlier.json"),
                            "--out", str(tmp_path / "out")])
    assert "list indices" not in str(error.value) and "('orders')" not in str(error.value)


def test_no_change_for_shorter_orders_is_the_reference_loss_after_as_many_steps(recording):
    orders = _orders(3, seed=2)[:, :6]
    check = check_methods(recording, orders, ["adam"], true_losses=[1.0, 2.0, 3.0])
    rec = Recording.open(recording)
    assert rec.probe_steps[6] == 6 and check.reference_loss == pytest.approx(rec.probe_scalars["val_loss"][6])
    assert check.reference_loss != pytest.approx(rec.probe_scalars["val_loss"][-1])


class FrozenFirstLayer(TinyClassifier):
    """Fine-tuning style: the first layer stays frozen (requires_grad False); only the rest trains."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[0].requires_grad_(False)


def test_a_model_with_frozen_parameters_is_estimated_as_well_as_retraining_shows(tmp_path):
    from lpl.order.adjoint import record_sensitivities

    torch.manual_seed(0)
    path = record(tmp_path / "frozen", model=FrozenFirstLayer(lr=0.01), proj_dim=128)
    record_sensitivities(path, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    check = check_methods(path, _orders(8), methods=["linearized"])
    score = check.scores["linearized"]
    assert score.spearman > 0.8 and check.mae_over_no_change("linearized") < 0.5  # measured 0.95 and 0.09

    # the recording has the validation curvature: the linear readout is scored too, and `lpl estimate` gives it
    linear = OrderEstimator.from_recording(path, method="linearized", quadratic=False).estimate_many(_orders(8))
    assert check.scores["linearized (linear loss)"].estimates == pytest.approx(linear.final_loss.double().tolist())
    assert check.scores["linearized (linear loss)"].estimates != pytest.approx(score.estimates, abs=1e-9)
    estimate_main(["--recording", str(path), "--method", "linearized", "--linear-loss", "--orders", "random:4",
                   "--out", str(tmp_path / "estimate")])
    written = json.loads((tmp_path / "estimate" / "estimates.json").read_text())
    orders = read_orders("random:4", Recording.open(path).order, 0)
    expected = OrderEstimator.from_recording(path, method="linearized", quadratic=False).estimate_many(orders)
    assert written["linear_loss"] is True
    assert [row["final_loss"] for row in written["estimates"]] == pytest.approx(expected.final_loss.tolist())


class FrozenLayerAdamL2(FrozenFirstLayer):
    """Adam with coupled (L2) weight decay in one param group."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=0.3)


class FrozenGroupFirst(FrozenFirstLayer):
    """The same training, laid out as fine-tuning often is: the frozen layer's group first with its own lr and no
    weight decay, then the trained weights (betas as a config's list) and biases (torch's default tuple)."""

    def configure_optimizers(self):
        head = self.net[4]
        return torch.optim.Adam([{"params": self.net[0].parameters(), "lr": 0.1, "weight_decay": 0.0},
                                 {"params": [head.weight], "betas": [0.9, 0.999]}, {"params": [head.bias]}],
                                lr=self.hparams.lr, weight_decay=0.3)


def test_a_frozen_param_group_listed_first_does_not_stand_for_the_run(tmp_path):
    """The recorder takes lr, betas, eps and weight decay from the groups that train: a frozen first group with
    other values neither refuses the run nor replaces its weight decay (it did: 0.0, and estimates 4x farther off)."""
    paths = {}
    for model_class in (FrozenLayerAdamL2, FrozenGroupFirst):
        torch.manual_seed(0)
        paths[model_class] = record(tmp_path / model_class.__name__, model=model_class(lr=0.01), proj_dim=128)
    single, grouped = (Recording.open(paths[c]) for c in (FrozenLayerAdamL2, FrozenGroupFirst))
    assert grouped.manifest["optimizer"]["weight_decay"] == single.manifest["optimizer"]["weight_decay"] == 0.3
    assert grouped.manifest["optimizer"]["lr"] == 0.01 and "weight_decays" not in grouped.manifest["optimizer"]
    assert grouped.manifest["steps"][0]["group_weight_decay"] == [0.0, 0.3, 0.3]
    orders = _orders(3)
    for method in ("zeroth_order", "first_order", "adam"):
        expected = OrderEstimator.from_recording(paths[FrozenLayerAdamL2], method=method).estimate_many(orders)
        estimated = OrderEstimator.from_recording(paths[FrozenGroupFirst], method=method).estimate_many(orders)
        torch.testing.assert_close(estimated.final_loss, expected.final_loss, rtol=0, atol=1e-6)
    reversed_order = list(reversed(range(NUM_BATCHES)))
    assert retrain(paths[FrozenGroupFirst], reversed_order).final_loss == pytest.approx(
        retrain(paths[FrozenLayerAdamL2], reversed_order).final_loss, abs=1e-6)
