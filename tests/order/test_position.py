"""Position map against brute-force retraining of the moved orders."""

from __future__ import annotations

import pytest
import torch

from lpl.order.estimator import OrderEstimator
from lpl.order.position import moved, plot_position_map, position_map
from lpl.utils.errors import LplError
from test_replay_task import NUM_BATCHES, make_task


def test_moved():
    assert moved(torch.tensor([0, 1, 2, 3]), 1, 3).tolist() == [0, 2, 3, 1]
    assert moved(torch.tensor([0, 1, 2, 3]), 3, 0).tolist() == [3, 0, 1, 2]


def test_position_map_tracks_retraining(tmp_path):
    task = make_task(lr=0.003, curvature_rank=2)
    estimator = OrderEstimator(task.data, method="adam_first_order")
    batches, positions = [1, 5, 8], [0, 4, 8, 11]
    matrix = position_map(estimator, batches, positions=positions)
    assert matrix.shape == (3, 4)
    truth = torch.tensor([
        [task.retrain(moved(torch.arange(NUM_BATCHES), b, p).tolist())[2][b] for p in positions] for b in batches
    ])
    centred = lambda m: (m - m.mean(dim=1, keepdim=True)).flatten()  # noqa: E731 - the position effect per batch
    assert torch.corrcoef(torch.stack([centred(matrix), centred(truth)]))[0, 1] > 0.8
    # first versus last: the estimate gets the direction of the position effect right for every batch
    assert ((truth[:, -1] - truth[:, 0]).sign() == (matrix[:, -1] - matrix[:, 0]).sign()).all()
    path = plot_position_map(matrix, tmp_path / "map.png", batches=batches, positions=positions)
    assert path.stat().st_size > 1000


def test_position_map_errors():
    estimator = OrderEstimator(make_task(lr=0.003, curvature_rank=0, steps=4).data, method="adam")
    with pytest.raises(LplError, match="batch id 7"):
        position_map(estimator, [7])
    with pytest.raises(LplError, match="position 4"):
        position_map(estimator, [0], positions=[4])
    for batches, kwargs in (([], {}), (3, {}), ([1.7], {}), ([0], {"positions": []}), ([0], {"chunk": 0})):
        with pytest.raises(LplError, match="must be"):
            position_map(estimator, batches, **kwargs)


def test_a_batch_trained_several_times_moves_its_last_visit():
    assert moved(torch.tensor([0, 1, 2, 0, 1, 2]), 1, 0).tolist() == [1, 0, 1, 2, 0, 2]
    assert moved(torch.tensor([0, 1, 2, 0, 1, 2]), 0, 5).tolist() == [0, 1, 2, 1, 2, 0]
