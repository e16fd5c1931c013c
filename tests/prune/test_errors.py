"""Every user mistake gets a clear LplError."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpl.prune import PruneResult, apply_masks, prune_model, to_block_sparse
from lpl.utils.errors import LplError

from prune_helpers import TinyViT


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.2])
def test_flops_keep_outside_unit_interval(tiny_vit, batches, keep):
    with pytest.raises(LplError, match="flops_keep"):
        prune_model(tiny_vit, batches, flops_keep=keep)


@pytest.mark.parametrize("block", [(0, 8), (8, -2), (8,), (64, 8), (8, 200)])
def test_block_size_not_positive_or_larger_than_a_layer(tiny_vit, batches, block):
    with pytest.raises(LplError, match="block_size"):
        prune_model(tiny_vit, batches, block_size=block)


def test_a_layer_smaller_than_a_block_is_named_with_the_exclude_that_leaves_it_dense():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))  # a 5-class output
    batches = [(torch.randn(8, 40), torch.randint(0, 5, (8,))) for _ in range(2)]
    loss = lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    with pytest.raises(LplError, match=r"larger than 1 of the selected Linear layers \(e.g. '2' of shape \(5, 64\)\)"
                                       r".*exclude=\['\*head\*', '2'\]"):
        prune_model(mlp, batches, block_size=(8, 8), loss=loss)
    result = prune_model(mlp, batches, block_size=(8, 8), flops_keep=0.5, loss=loss, exclude=["*head*", "2"])
    assert set(result.block_masks) == {"0"}


def test_include_exclude_matching_no_linear(tiny_vit, batches):
    with pytest.raises(LplError, match="match no Linear"):
        prune_model(tiny_vit, batches, include=["*.nothing"])
    with pytest.raises(LplError, match="match no Linear"):
        prune_model(tiny_vit, batches, exclude=["*"])


def test_empty_calibration_loader(tiny_vit):
    with pytest.raises(LplError, match="no batches"):
        prune_model(tiny_vit, [])


def test_model_without_trainable_weights(tiny_vit, batches):
    tiny_vit.requires_grad_(False)
    with pytest.raises(LplError, match="no trainable weights"):
        prune_model(tiny_vit, batches)


def test_an_exported_model_is_refused(tiny_vit, batches):
    """Pruning it again would prune only the Linears the export left dense, under a budget that is not the model's."""
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    apply_masks(tiny_vit, result)
    to_block_sparse(tiny_vit, result)
    with pytest.raises(LplError, match="block-sparse layers already .* Prune the dense"):
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)


def test_a_round_that_empties_a_layer_of_a_serial_network_names_stages_not_the_model():
    """The first of two rounds removes a whole layer (min_density=0), so the second sees no gradient anywhere: the
    error says what did it (it blamed an untrained model before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 10))
    batches = [(torch.randn(8, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    options = dict(block_size=16, flops_keep=0.5, min_density=0.0, include=["0", "2"],
                   loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert not prune_model(model, batches, stages=1, **options).block_masks["2"].any()  # one round: the layer goes
    with pytest.raises(LplError, match=r"earlier round \(stages\) pruned every block of 1 layer.*stages=1"):
        prune_model(model, batches, stages=2, **options)


class _Branches(nn.Module):
    """Two branches into one head; a2's weights are tiny, so the first round removes it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2, self.b1 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            self.a2.weight.mul_(1e-3)

    def forward(self, x):
        return self.head(self.a2(F.gelu(self.a1(x))) + self.b1(x))


def test_a_layer_an_earlier_round_cut_off_is_named_with_that_cause():
    torch.manual_seed(0)
    model, batches = _Branches(), [(torch.randn(8, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"zero gradient in 1 selected layer\(s\) \(e.g. \['a1'\]\).*an earlier round "
                                         r"\(stages\) pruned every block of \['a2'\]"):
        result = prune_model(model, batches, block_size=8, flops_keep=0.5, min_density=0.0, stages=2,
                             include=["a1", "a2", "b1"], loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert not result.block_masks["a2"].any()


def test_densities_inverted_or_budget_unreachable(tiny_vit, batches):
    with pytest.raises(LplError, match="min_density"):
        prune_model(tiny_vit, batches, min_density=0.6, max_density=0.4)
    with pytest.raises(LplError, match="cannot be met"):
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.2, min_density=0.5)
    with pytest.raises(LplError, match="cannot be met"):
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.95, max_density=0.6)


def test_bad_importance_allocation_and_loss(tiny_vit, batches):
    with pytest.raises(LplError, match="importance"):
        prune_model(tiny_vit, batches, importance="random")
    with pytest.raises(LplError, match="allocation"):
        prune_model(tiny_vit, batches, allocation="greedy")
    with pytest.raises(LplError, match="loss"):
        prune_model(tiny_vit, batches, loss="hinge")


def test_saved_result_on_a_model_with_other_layers_or_shapes(tiny_vit, batches, tmp_path):
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    result.save(tmp_path / "r")
    loaded = PruneResult.load(tmp_path / "r")
    with pytest.raises(LplError, match="shape"):
        apply_masks(TinyViT(embed_dim=48), loaded)
    other_names = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(LplError, match="does not have"):
        apply_masks(other_names, loaded)
    with pytest.raises(LplError, match="not a saved PruneResult"):
        PruneResult.load(tmp_path / "missing")


class WeightReadDirectly(nn.Module):
    """Like EVA's fused qkv: one Linear's weight is used through F.linear, so the module itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.side = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = h + nn.functional.linear(h, self.side.weight)
        return self.fc2(h)

    def loss(self, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])


def test_layers_never_called_as_modules_stay_dense_by_default_and_are_an_error_when_named():
    batches = [{"x": torch.randn(8, 16), "y": torch.randint(0, 8, (8,))} for _ in range(2)]
    model = WeightReadDirectly()
    with pytest.warns(UserWarning, match="never calls them as modules"):
        result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5)
    assert set(result.block_masks) == {"fc1", "fc2"}
    with pytest.raises(LplError, match="not called in the forward"):
        prune_model(model, batches, block_size=(8, 8), include=["fc1", "side"])


def test_budget_finer_than_the_block_granularity_names_the_nearest_reachable_share():
    batches = [{"x": torch.randn(8, 16), "y": torch.randint(0, 8, (8,))} for _ in range(2)]
    model = WeightReadDirectly()  # fc1 + fc2: 12 blocks of 8x8, so shares move in steps of 1/12
    with pytest.raises(LplError, match=r"block granularity.*nearest reachable share below it is 0\.58"):
        prune_model(model, batches, block_size=(8, 8), flops_keep=0.6, include=["fc1", "fc2"])
    for stages in (1, 2, 3):  # intermediate rounds land near their budgets; the last one meets it
        result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, include=["fc1", "fc2"], stages=stages)
        assert result.flops_keep == pytest.approx(0.5)


def test_stages_below_one(tiny_vit, batches):
    from lpl.prune import BlockPruneCallback

    for stages in (0, 2.5):
        with pytest.raises(LplError, match="stages must be an int >= 1"):
            prune_model(tiny_vit, batches, stages=stages)
        with pytest.raises(LplError, match="stages must be an int >= 1"):
            BlockPruneCallback(stages=stages)


@pytest.mark.parametrize("option, value", [("flops_keep", None), ("flops_keep", "0.5"), ("flops_keep", True),
                                           ("lambda_power", None), ("min_density", "low"),
                                           ("lambda_power", float("nan")), ("lambda_power", float("inf"))])
def test_options_that_are_not_numbers(tiny_vit, batches, option, value):
    from lpl.prune import BlockPruneCallback

    with pytest.raises(LplError, match=f"{option} must be a finite number"):
        prune_model(tiny_vit, batches, **{option: value})
    with pytest.raises(LplError, match=f"{option} must be a finite number"):
        BlockPruneCallback(**{option: value})


def test_block_size_as_one_int_means_square_blocks_and_fractions_are_refused(tiny_vit, batches):
    from lpl.prune import BlockPruneCallback

    assert prune_model(tiny_vit, batches, block_size=8, flops_keep=0.5, stages=1).block_size == (8, 8)
    assert BlockPruneCallback(block_size=16).options["block_size"] == (16, 16)
    for block in ((4.5, 4), "16", (8, True)):
        with pytest.raises(LplError, match="block_size must be"):
            prune_model(tiny_vit, batches, block_size=block)


class LongLoader:
    """Says it has many batches (a whole training loader), yields a few."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return 5000

    def __iter__(self):
        return iter(self.batches)


def test_calibration_batch_count_is_checked_and_a_whole_loader_kept_in_memory_warns(tiny_vit, batches):
    for count in (0, "2", 1.5, True):
        with pytest.raises(LplError, match="calib_batches must be a positive int"):
            prune_model(tiny_vit, batches, block_size=(8, 8), calib_batches=count)
    with pytest.warns(UserWarning, match="calib_batches=None takes all 5000"):
        prune_model(tiny_vit, LongLoader(batches), block_size=(8, 8), flops_keep=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*calib_batches")  # bounded: nothing kept beyond 2 batches
        prune_model(tiny_vit, LongLoader(batches), block_size=(8, 8), flops_keep=0.5, calib_batches=2)


@pytest.mark.parametrize("options", [dict(stages=2), dict(stages=1, importance="taylor1")],
                         ids=["batches kept for several passes", "one pass over the loader"])
def test_a_loader_shorter_than_calib_batches_warns_once(tiny_vit, batches, options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, calib_batches=len(batches) + 5, **options)
    short = [w for w in caught if "calibration loader yields" in str(w.message)]
    assert len(short) == 1 and f"yields {len(batches)} batches" in str(short[0].message)


def test_prune_model_says_when_the_cost_model_predicts_the_pruned_layers_slower(tiny_vit, batches):
    # only BlockPruneCallback said it; prune_model's own users got a slower model without a word
    with pytest.warns(UserWarning, match=r"prune_model: the cost model predicts the pruned layers [\d.]+x slower "
                                         r"than dense at 8x8 blocks"):
        result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    assert result.predicted_speedup < 1


def test_include_and_exclude_take_one_pattern_as_a_string(tiny_vit, batches):
    # a string was read as its characters: include="*.qkv" pruned every layer ('*' matches all)
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, include="*.qkv")
    assert set(result.block_masks) == {"model.blocks.0.attn.qkv"}
    with pytest.raises(LplError, match="include must be a glob pattern"):
        prune_model(tiny_vit, batches, block_size=(8, 8), include=[3])


def test_a_density_range_missing_the_budget_names_flops_keep(tiny_vit, batches):
    # it named the first of two rounds' budget (0.707) instead of the flops_keep asked for
    with pytest.raises(LplError, match=r"flops_keep=0.500 cannot be met within the per-layer densities"):
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, min_density=0.9)


def test_cost_model_as_the_path_of_a_saved_profile(tiny_vit, batches, tmp_path):
    from lpl.prune.hardware import default_profile

    profile = default_profile("cpu")
    profile.save(tmp_path / "profile.json")
    by_path = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5,
                          cost_model=str(tmp_path / "profile.json"))
    by_object = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, cost_model=profile)
    assert all(torch.equal(by_path.block_masks[n], by_object.block_masks[n]) for n in by_object.block_masks)
    with pytest.raises(LplError, match="cost_model must be a HardwareProfile"):
        prune_model(tiny_vit, batches, block_size=(8, 8), cost_model=3)


def _nan_images(batches):
    return [{**batch, "image": torch.full_like(batch["image"], float("nan"))} for batch in batches]


def test_calibration_data_or_losses_that_cannot_rank_blocks(tiny_vit, batches):
    with pytest.raises(LplError, match="calibration loss is nan"):
        prune_model(tiny_vit, _nan_images(batches), block_size=(8, 8))
    with pytest.raises(LplError, match=r"must be a scalar tensor.*shape \(8,\)"):
        prune_model(tiny_vit, batches, block_size=(8, 8), loss=lambda model, batch: F.cross_entropy(
            model(batch["image"]), batch["label"], reduction="none"))
    head = tiny_vit.model.head
    with torch.no_grad():  # a zero head: no gradient reaches the layers before it
        head.weight.zero_()
    with pytest.raises(LplError, match="zero gradient in every selected layer"):
        prune_model(tiny_vit, batches, block_size=(8, 8))
    assert prune_model(tiny_vit, batches, block_size=(8, 8), importance="magnitude").flops_keep == pytest.approx(
        0.5, abs=0.01)  # magnitude needs no gradient


def test_inference_mode_is_refused_and_its_tensors_calibrate(tiny_vit, batches):
    with torch.inference_mode():
        with pytest.raises(LplError, match="inference_mode"):
            prune_model(tiny_vit, batches, block_size=(8, 8))
        frozen = [{key: value.clone() for key, value in batch.items()} for batch in batches]
    expected = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    result = prune_model(tiny_vit, frozen, block_size=(8, 8), flops_keep=0.5)
    assert all(torch.equal(result.block_masks[n], expected.block_masks[n]) for n in expected.block_masks)
