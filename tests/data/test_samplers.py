import numpy as np
import pytest
import torch

from lpl.data import samplers
from lpl.data.samplers import OrderedBatchSampler, SeededBatchSampler
from lpl.order.pool import plan_pool
from lpl.utils.errors import LplError


def test_seeded_batches_are_a_seeded_permutation_per_epoch():
    sampler = SeededBatchSampler(num_samples=10, batch_size=3, seed=5)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert sampler.global_batches(0) == [expected[0:3], expected[3:6], expected[6:9]]  # drop_last
    assert sampler.global_batches(1) != sampler.global_batches(0)
    assert SeededBatchSampler(10, 3, seed=5).global_batches(1) == sampler.global_batches(1)
    assert list(sampler) == sampler.global_batches(0) and sampler.epoch == 1
    assert len(SeededBatchSampler(10, 3, seed=5, drop_last=False).global_batches(0)) == 4


def test_ordered_sampler_follows_the_order_with_repeats():
    sampler = OrderedBatchSampler([[0, 1], [2, 3], [4, 5]], order=[2, 2, 0])
    assert list(sampler) == [[4, 5], [4, 5], [0, 1]]
    with pytest.raises(LplError, match="order names batch 3"):
        OrderedBatchSampler([[0, 1]], order=[3])


@pytest.mark.parametrize("make", [lambda: SeededBatchSampler(20, 4, seed=1),
                                  lambda: OrderedBatchSampler([[i] for i in range(5)], [4, 3, 2, 1, 0])])
def test_state_dict_resumes_mid_epoch_at_the_exact_batch(make):
    sampler = make()
    stream = iter(sampler)
    seen = [next(stream), next(stream)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "consumed": 2, "plan": sampler.plan_digest(0, 2)}
    fresh = make()
    fresh.load_state_dict(state)
    assert seen + list(fresh) == sampler.global_batches(0)
    assert list(fresh) == fresh.global_batches(1)  # the next epoch starts from its first batch


def test_ranks_get_contiguous_slices_of_every_global_batch(monkeypatch):
    sampler = OrderedBatchSampler([[0, 1, 2, 3], [4, 5, 6, 7]])
    slices = []
    for rank in range(2):
        monkeypatch.setattr(samplers, "rank_and_world", lambda rank=rank: (rank, 2))
        slices.append(list(sampler))
    assert slices == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    monkeypatch.setattr(samplers, "rank_and_world", lambda: (0, 3))
    with pytest.raises(LplError, match="divisible by the number of devices"):
        list(OrderedBatchSampler([[0, 1, 2, 3]]))


def test_a_short_last_batch_the_ranks_cannot_share_is_refused_before_the_epoch_trains(monkeypatch):
    monkeypatch.setattr(samplers, "rank_and_world", lambda: (0, 2))
    sampler = SeededBatchSampler(num_samples=9, batch_size=4, drop_last=False)  # batches of 4, 4, 1
    yielded = []
    with pytest.raises(LplError, match=r"batch 2 of epoch 0 holds 1 samples.*short last batch.*drop_last=True"):
        yielded.extend(sampler)
    assert yielded == []  # refused before the first step, not when the short batch comes
    assert len(list(SeededBatchSampler(num_samples=10, batch_size=4, drop_last=False))) == 3  # 4, 4, 2 split fine
    # an explicit pool has no drop_last to advise
    with pytest.raises(LplError, match=r"short last batch: leave it out of `order`"):
        list(OrderedBatchSampler([[0, 1], [2, 3], [4]]))


def test_plan_pool_deduplicates_repeated_batches_across_epochs():
    ordered = OrderedBatchSampler([[0, 1], [2, 3], [4, 5]], order=[1, 0, 2])
    pool, order = plan_pool(ordered, batches_per_epoch=3, total_steps=7)
    assert pool == [[2, 3], [0, 1], [4, 5]] and order == [0, 1, 2, 0, 1, 2, 0]
    seeded = SeededBatchSampler(12, 4, seed=0)
    pool, order = plan_pool(seeded, batches_per_epoch=2, total_steps=5)  # limit_train_batches cuts epochs to 2
    assert [pool[i] for i in order] == (seeded.global_batches(0)[:2] + seeded.global_batches(1)[:2]
                                        + seeded.global_batches(2)[:1])


def test_an_abandoned_pass_is_followed_by_the_next_epoch_and_a_restored_position_continues():
    """Lightning stops drawing after limit_train_batches (or the epoch's last batch) without exhausting the
    sampler: the next pass is the next epoch from its first batch; a position from load_state_dict resumes."""
    sampler = SeededBatchSampler(num_samples=12, batch_size=3, seed=0)
    first = iter(sampler)
    assert [next(first) for _ in range(2)] == sampler.global_batches(0)[:2]
    assert list(iter(sampler)) == sampler.global_batches(1)
    state = {"epoch": 2, "consumed": 1}
    sampler.load_state_dict(state)
    assert list(iter(sampler)) == sampler.global_batches(2)[1:]
    assert next(iter(sampler)) == sampler.global_batches(3)[0]


def test_a_trainers_data_parallel_rank_and_size_pick_the_slice():
    """Under tensor parallelism 4 processes form 2 data-parallel groups: the slice follows Lightning's sampler
    arguments, not the process count."""
    from types import SimpleNamespace

    sampler = OrderedBatchSampler([[0, 1, 2, 3], [4, 5, 6, 7]])
    sampler.trainer = SimpleNamespace(world_size=4, global_rank=3,
                                      distributed_sampler_kwargs={"rank": 1, "num_replicas": 2})
    assert list(sampler) == [[2, 3], [6, 7]]
    sampler.trainer = SimpleNamespace(world_size=1, global_rank=0, distributed_sampler_kwargs=None)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_an_empty_order_is_refused():
    with pytest.raises(LplError, match="order lists no batch"):
        OrderedBatchSampler([[0, 1], [2, 3]], order=[])


def test_arrays_and_tensors_are_read_like_lists():
    batches, order = [[0, 1], [2, 3], [4, 5]], [2, 0, 2]
    expected = list(OrderedBatchSampler(batches, order))
    assert list(OrderedBatchSampler(np.array(batches), np.array(order))) == expected
    assert list(OrderedBatchSampler(torch.tensor(batches), torch.tensor(order))) == expected
    assert list(OrderedBatchSampler(batches, [torch.tensor(i) for i in order])) == expected
    per_epoch = OrderedBatchSampler(batches, np.array([[2, 0], [1, 1]]))
    assert per_epoch.per_epoch and list(per_epoch) == [[4, 5], [0, 1]] and list(per_epoch) == [[2, 3], [2, 3]]
    assert SeededBatchSampler(np.int64(10), np.int64(3), seed=np.int64(1)).global_batches(0) == (
        SeededBatchSampler(10, 3, seed=1).global_batches(0))


def test_malformed_batches_orders_and_sizes_get_a_plain_message():
    with pytest.raises(LplError, match="each a list of sample ids"):
        OrderedBatchSampler([0, 1, 2])
    with pytest.raises(LplError, match="order must be a list, got 5"):
        OrderedBatchSampler([[0, 1]], order=5)
    with pytest.raises(LplError, match="num_samples must be an int >= 1, got 10.0"):
        SeededBatchSampler(10.0, 2)
    with pytest.raises(LplError, match="batch_size must be an int >= 1"):
        SeededBatchSampler(10, "2")
    with pytest.raises(LplError, match="use_distributed_sampler=False"):
        SeededBatchSampler(torch.utils.data.SequentialSampler(range(3)), 2)


CHANGED_PLANS = {
    "a sample more": lambda: SeededBatchSampler(21, 4, seed=1),
    "another batch size": lambda: SeededBatchSampler(20, 5, seed=1),
    "another seed": lambda: SeededBatchSampler(20, 4, seed=2),
    "another order": lambda: OrderedBatchSampler([[i] for i in range(5)], [3, 4, 2, 1, 0]),
}


@pytest.mark.parametrize("changed", CHANGED_PLANS.values(), ids=CHANGED_PLANS)
def test_a_position_saved_under_another_plan_is_refused(changed):
    """It fitted the new epoch's length and resumed in another shuffle: samples trained twice, others skipped."""
    original = SeededBatchSampler(20, 4, seed=1) if isinstance(changed(), SeededBatchSampler) else \
        OrderedBatchSampler([[i] for i in range(5)], [4, 3, 2, 1, 0])
    stream = iter(original)
    next(stream)
    state = original.state_dict()
    with pytest.raises(LplError, match="than this data now plans there"):
        changed().load_state_dict(state)
    legacy = {"epoch": state["epoch"], "consumed": state["consumed"]}  # saved before the digest existed
    changed().load_state_dict(legacy)


def test_a_plan_that_changed_only_after_the_saved_position_or_at_an_epoch_start_resumes():
    """Nothing the checkpoint trained in the epoch is trained again or skipped: the new plan goes on."""
    original = OrderedBatchSampler([[i] for i in range(5)], [4, 3, 2, 1, 0])
    stream = iter(original)
    next(stream)
    changed_later = OrderedBatchSampler([[i] for i in range(5)], [4, 1, 2, 3, 0])
    changed_later.load_state_dict(original.state_dict())
    assert list(changed_later) == [[1], [2], [3], [0]]
    at_start = SeededBatchSampler(20, 4, seed=1)
    list(at_start)  # one whole epoch: the position is epoch 1, batch 0
    bigger = SeededBatchSampler(40, 8, seed=1)
    bigger.load_state_dict(at_start.state_dict())
    assert list(bigger) == bigger.global_batches(1)
