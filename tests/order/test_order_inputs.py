"""The forms in which users pass orders to the estimator and check_orders: accepted ones agree, others fail clearly."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lpl.order import OrderEstimator, Recording
from lpl.order.estimator import replay_data_from_recording
from lpl.order.replay import check_orders
from lpl.utils.errors import LplError
from test_estimator_task import NUM_BATCHES, record

REFERENCE = list(range(NUM_BATCHES))


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("order") / "rec", proj_dim=64, curvature_rank=0)


@pytest.fixture(scope="module")
def estimator(recording):
    return OrderEstimator.from_recording(recording, method="zeroth_order")


@pytest.mark.parametrize("order", [
    REFERENCE, tuple(REFERENCE), np.arange(NUM_BATCHES), np.arange(NUM_BATCHES, dtype=np.int32),
    np.arange(NUM_BATCHES, dtype=np.uint8), torch.arange(NUM_BATCHES), torch.arange(NUM_BATCHES, dtype=torch.int32),
    [torch.tensor(i) for i in REFERENCE], [np.int64(i) for i in REFERENCE],
], ids=["list", "tuple", "int64", "int32", "uint8", "tensor", "tensor_int32", "list_of_0d_tensors", "numpy_scalars"])
def test_every_integer_form_of_one_order_gives_the_same_estimate(estimator, order):
    assert estimator.estimate(order).final_loss == pytest.approx(estimator.estimate(REFERENCE).final_loss)


def test_repeated_ids_and_prefixes_are_orders(estimator):
    assert np.isfinite(estimator.estimate([0] * NUM_BATCHES).final_loss)
    assert estimator.estimate([3, 3, 1]).loss_curve.shape == (4,)


def test_a_list_of_1d_tensors_is_stacked_as_rows_but_refused_as_a_predict_batch(estimator):
    orders = [torch.arange(NUM_BATCHES), torch.arange(NUM_BATCHES).flip(0)]
    expected = estimator.estimate_many(torch.stack(orders)).final_loss
    assert torch.equal(estimator.estimate_many(orders).final_loss, expected)
    assert torch.equal(estimator.estimate_many([o.numpy() for o in orders]).final_loss, expected)
    assert torch.equal(estimator.estimate_many([o.tolist() for o in orders]).final_loss, expected)
    assert [e.final_loss for e in estimator.predict_step([torch.stack(orders)], 0)] == pytest.approx(expected.tolist())
    # from a loader, a list of 1-D tensors of one length may be what default_collate makes of lists of orders: one
    # tensor per position
    with pytest.raises(LplError, match="one tensor per position"):
        estimator.predict_step(orders, 0)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_predict_takes_whole_orders_from_a_list_collating_loader(estimator, batch_size):
    """collate_fn=list hands predict_step whole orders, of one length or several in a batch (batches of two equal
    lengths were refused as positions)."""
    orders = [torch.arange(NUM_BATCHES), torch.arange(NUM_BATCHES).flip(0), torch.arange(3).flip(0), torch.arange(2)]
    loader = torch.utils.data.DataLoader(orders, batch_size=batch_size, collate_fn=list)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    predicted = [estimate for batch in trainer.predict(estimator, loader) for estimate in batch]
    assert [e.final_loss for e in predicted] == pytest.approx([estimator.estimate(o).final_loss for o in orders])
    assert [len(e.loss_curve) for e in predicted] == [NUM_BATCHES + 1, NUM_BATCHES + 1, 4, 3]


@pytest.mark.parametrize("orders, message", [
    ([[0, 1, 2], [0, 1]], "one length"),
    ([torch.arange(3), torch.arange(2)], "one length"),
    ([[0, 1], 2], "one length"),
    ("012345", "got the string '012345'"),
    (["0", "1"], "got the string '0'"),
    ([True, False, True], "True/False"),
    ([0, True, 2], "True/False"),
    ([[0, 1], [True, 1]], "True/False"),
    (np.array([True, False]), "True/False"),
    (torch.tensor([[True, False]]), "True/False"),
    ([0.0, 1.0], "integer pool batch ids"),
    (np.array([[0, 1], [2]], dtype=object), "could not read ndarray"),
    (None, "could not read NoneType"),
    ([], "non-empty"),
    (torch.zeros(2, 2, 3, dtype=torch.long), r"got 3 dimensions \(shape \(2, 2, 3\)\)"),
    (torch.zeros(3, dtype=torch.long, device="meta"), "meta device hold no ids"),
    ([[0] * (NUM_BATCHES + 1)], "longer than"),
    ([[0, NUM_BATCHES]], f"batch id {NUM_BATCHES}"),
    ([[0, -1]], "batch id -1"),
])
def test_bad_orders_raise_lpl_errors_that_say_what_is_wrong(estimator, orders, message):
    with pytest.raises(LplError, match=message):
        estimator.estimate_many(orders)
    with pytest.raises(LplError, match=message):
        check_orders(orders, NUM_BATCHES, NUM_BATCHES)


@pytest.mark.parametrize("order, message", [
    ("012345", "got the string"), ([True] * 3, "True/False"), ([0.0, 1.0], "integer pool batch ids"),
    ([], "non-empty"), ([REFERENCE], r"one order .* got shape \(1, 10\)"), (3, r"one order .* got shape \(\)"),
    ([0] * (NUM_BATCHES + 1), "longer than"), ([0, NUM_BATCHES], f"batch id {NUM_BATCHES}"), ([0, -1], "batch id -1"),
])
def test_bad_single_orders_raise_lpl_errors(estimator, order, message):
    with pytest.raises(LplError, match=message):
        estimator.estimate(order)


def test_replay_data_refuses_unreadable_learning_rates_of_an_unchecked_recording(recording):
    opened = Recording.open(recording)
    opened.manifest["steps"][2]["lr"] = "0.01"  # past Recording.open's checks, as another reader's object may be
    with pytest.raises(LplError, match="unreadable learning rates.*record again"):
        replay_data_from_recording(opened)
    opened.manifest["steps"][2]["lr"] = 0.01
    opened.manifest["optimizer"]["betas"] = [0.9]
    with pytest.raises(LplError, match=r"betas \(0.9,\).*record again"):
        replay_data_from_recording(opened)


def test_search_arguments_of_the_wrong_kind_are_refused(estimator):
    """Floats and bools as batch ids were truncated into other batches; fractional budgets and rates went through."""
    from lpl.order import curriculum

    for kwargs, message in (({"batches": [0.9, 1.9, 2.9]}, "whole numbers"),
                            ({"batches": [True, False]}, "whole numbers"),
                            ({"budget": 20.5}, "budget must be a whole number"),
                            ({"population": 8.0}, "population must be a whole number"),
                            ({"mutation_rate": 5.0}, "mutation_rate is a probability")):
        with pytest.raises(LplError, match=message):
            curriculum.search(estimator, **kwargs)


def test_from_recording_refuses_a_model_that_is_not_a_module(recording):
    with pytest.raises(LplError, match="model must be the module the recording was made for"):
        OrderEstimator.from_recording(recording, model="NormMLP")
