"""How a layer is called must not change its statistics: twice per forward, on flattened or window-split tokens,
behind a frozen layer, with empty batches; and layers sharing one weight."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpl.prune import apply_masks, prune_model, to_block_sparse
from lpl.prune.blocks import expand_block_mask
from lpl.prune.api import select_layers
from lpl.prune.importance import collect_statistics
from lpl.utils.errors import LplError
from lpl.utils.loss import module_loss

FEATURES, TOKENS, CLASSES = 16, 4, 8


class TokenMLP(nn.Module):
    """Token features -> mean-pooled logits; ``shared`` runs twice, ``flatten`` feeds fc1 [B * T, C] rows."""

    def __init__(self, shared: bool = False, flatten: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(FEATURES, 32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, CLASSES)
        self.shared, self.flatten = shared, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.flatten:
            h = torch.tanh(self.fc1(h.reshape(-1, h.shape[-1]))).reshape(h.shape)
        else:
            h = torch.tanh(self.fc1(h))
        if self.shared:
            h = torch.tanh(self.fc1(h)) + h
        return self.fc2(h).mean(1)

    def loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1])


def _batches(count: int = 3, size: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, TOKENS, FEATURES, generator=generator), torch.randint(0, CLASSES, (size,),
                                                                                        generator=generator))
            for _ in range(count)]


def test_a_layer_called_twice_sums_its_calls():
    model, batches = TokenMLP(shared=True), _batches()
    layers = select_layers(model, ["fc1"], [])
    stats = collect_statistics(model, layers, batches, (8, 8), module_loss, with_gram=False)
    grads = []
    for batch in batches:
        model.zero_grad()
        module_loss(model, batch).backward()
        grads.append(model.fc1.weight.grad.clone())
    torch.testing.assert_close(stats["fc1"].grad_mean, torch.stack(grads).mean(0), rtol=1e-4, atol=1e-7)
    assert stats["fc1"].tokens_per_sample == 2 * TOKENS  # its FLOPs count both calls


def test_flattened_tokens_give_the_statistics_of_the_token_tensor():
    batches = _batches()
    stats = [collect_statistics(model, select_layers(model, ["fc1"], []), batches, (8, 8), module_loss)["fc1"]
             for model in (TokenMLP(), TokenMLP(flatten=True))]
    torch.testing.assert_close(stats[0].gram, stats[1].gram)
    torch.testing.assert_close(stats[0].first, stats[1].first)
    assert stats[0].tokens_per_sample == stats[1].tokens_per_sample == TOKENS
    masks = [prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[]).block_masks
             for model in (TokenMLP(), TokenMLP(flatten=True))]
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])


def test_empty_batches_are_skipped_and_a_frozen_first_layer_is_still_pruned():
    model = TokenMLP()
    model.inp.requires_grad_(False)  # its output needs no gradient for training, but calibration measures there
    batches = _batches()
    with_empty = batches[:1] + _batches(1, size=0) + batches[1:]
    result = prune_model(model, with_empty, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert "inp" in result.block_masks
    reference = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert all(torch.equal(result.block_masks[n], reference.block_masks[n]) for n in result.block_masks)
    with pytest.raises(LplError, match="no batches"):
        prune_model(model, _batches(2, size=0), block_size=(8, 8), flops_keep=0.5)
    # masks apply to it (no gradient to watch) and the rest trains with its blocks kept zero
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    apply_masks(model, result, optimizers=[optimizer])
    pruned = ~expand_block_mask(result.block_masks["inp"], tuple(model.inp.weight.shape), (8, 8))
    assert model.inp.weight[pruned].eq(0).all() and pruned.any()
    for batch in batches:
        optimizer.zero_grad()
        module_loss(model, batch).backward()
        optimizer.step()
    fc1_pruned = ~expand_block_mask(result.block_masks["fc1"], tuple(model.fc1.weight.shape), (8, 8))
    assert model.fc1.weight[fc1_pruned].eq(0).all() and model.inp.weight[pruned].eq(0).all()


class Tied(TokenMLP):
    def __init__(self) -> None:
        super().__init__()
        self.fc3 = nn.Linear(32, 32)
        self.fc3.weight = self.fc1.weight  # tied

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.fc2(torch.tanh(self.fc3(torch.tanh(self.fc1(h))))).mean(1)


def test_layers_sharing_a_weight_stay_dense_by_default_and_are_an_error_when_named():
    model, batches = Tied(), _batches()
    with pytest.warns(UserWarning, match="shares one weight tensor with 'fc3.weight'"):
        result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=["fc2"])
    assert set(result.block_masks) == {"inp"}
    with pytest.raises(LplError, match=r"shares one weight.*exclude=\['fc1', 'fc3'\]"):
        prune_model(model, batches, block_size=(8, 8), include=["fc*"])


class TiedToEmbedding(nn.Module):
    """A language model's head tied to its embedding table (the Embedding holds the weight, not a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(CLASSES * 4, 32)
        self.fc1 = nn.Linear(32, 32)
        self.lm = nn.Linear(32, CLASSES * 4, bias=False)
        self.lm.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(torch.tanh(self.fc1(self.emb(tokens)))).mean(1)

    def loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1])


def _token_batches():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(0, CLASSES * 4, (6, TOKENS), generator=generator),
             torch.randint(0, CLASSES * 4, (6,), generator=generator)) for _ in range(2)]


def test_a_layer_tied_to_another_module_is_refused_even_when_only_it_is_selected():
    """A Linear whose weight an Embedding (or an unselected Linear) also holds: its mask would zero the other's
    entries unseen (half the embedding table, uncounted), and export would untie them."""
    model = TiedToEmbedding()
    with pytest.raises(LplError, match=r"'lm' cannot be block-pruned: it shares one weight tensor with 'emb.weight'"):
        prune_model(model, _token_batches(), block_size=(8, 8), flops_keep=0.5, include=["lm"])
    with pytest.warns(UserWarning, match="'lm': it shares one weight tensor with 'emb.weight'"):
        result = prune_model(model, _token_batches(), block_size=(8, 8), flops_keep=0.5, stages=1)
    assert set(result.block_masks) == {"fc1"} and bool(model.emb.weight.ne(0).all())
    with pytest.raises(LplError, match=r"'fc1' cannot be block-pruned: it shares one weight tensor with 'fc3.weight'"):
        prune_model(Tied(), _batches(), block_size=(8, 8), include=["fc1"])


def test_apply_masks_refuses_a_result_whose_layer_is_tied_in_this_model():
    """A result computed on an untied copy applied to the tied model would prune the embedding table too."""
    untied = TiedToEmbedding()
    untied.lm.weight = nn.Parameter(untied.emb.weight.detach().clone())
    result = prune_model(untied, _token_batches(), block_size=(8, 8), flops_keep=0.5, include=["lm"], stages=1)
    with pytest.raises(LplError, match=r"layer 'lm' shares its weight with \['emb.weight'\]"):
        apply_masks(TiedToEmbedding(), result)


def test_linears_torch_reads_as_weights_are_named_when_left_dense():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.Sequential(nn.Linear(FEATURES, 32), layer)
    with pytest.warns(UserWarning, match=r"3 Linear layers left dense \(e.g. \['1.self_attn.out_proj', '1.linear1', "
                                         r"'1.linear2'\]\): torch reads them as weights"):
        assert list(select_layers(model, None, None)) == ["0"]


def test_masks_follow_the_model_to_another_dtype():
    model, batches = TokenMLP(), _batches()
    result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    apply_masks(model, result, optimizers=[optimizer])
    model.bfloat16()
    x, y = batches[0]
    F.cross_entropy(model(x.bfloat16()).float(), y).backward()
    optimizer.step()
    kept = result.block_masks["fc1"].repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert model.fc1.weight.grad.dtype == torch.bfloat16
    assert (model.fc1.weight[~kept] == 0).all() and (model.fc1.weight.grad[~kept] == 0).all()


def test_a_submodule_of_the_pruned_model_exports():
    class Wrapper(nn.Module):  # a LightningModule's `.model`, say
        def __init__(self) -> None:
            super().__init__()
            self.model = TokenMLP()

        def forward(self, x):
            return self.model(x)

    wrapper, batches = Wrapper(), _batches()
    result = prune_model(wrapper, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert "model.fc1" in result.block_masks
    apply_masks(wrapper.model, result)  # the network alone takes the masks too
    x = batches[0][0]
    expected = wrapper(x)
    sparse = to_block_sparse(wrapper.model, result)
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-6)
    assert type(sparse.fc1).__name__ == "BlockSparseLinear"


class SharedTable(TokenMLP):
    """A Linear applied to a table every sample shares (as Swin V2's relative-position MLP), added to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, TOKENS, FEATURES))
        self.bias_mlp = nn.Linear(FEATURES, 32)

    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.bias_mlp(self.table))
        return self.fc2(torch.tanh(self.fc1(h))).mean(1)


@pytest.mark.parametrize("batch_size", [6, TOKENS])  # TOKENS: the table [1, TOKENS, C] looked sequence-first
def test_a_layer_fed_a_table_the_batch_shares_stays_dense_by_default_and_is_an_error_when_named(batch_size):
    model, batches = SharedTable(), _batches(size=batch_size)
    with pytest.warns(UserWarning, match="without rows per sample"):
        result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert "bias_mlp" not in result.block_masks and "fc1" in result.block_masks
    with pytest.raises(LplError, match=r"\['bias_mlp'\].*no rows per sample"):
        prune_model(model, batches, block_size=(8, 8), include=["bias_mlp", "fc1"])


def test_a_masked_model_pickles_and_its_copy_still_masks_gradients():
    """ddp_spawn and torch.save(model) pickle the module: the mask hooks go along and work in the copy."""
    import pickle

    model, batches = TokenMLP(), _batches()
    result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    apply_masks(model, result)
    copy = pickle.loads(pickle.dumps(model))
    module_loss(copy, batches[0]).backward()
    kept = result.block_masks["fc1"].repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert (copy.fc1.weight.grad[~kept] == 0).all() and (copy.fc1.weight.grad[kept] != 0).any()


def test_export_frees_the_dense_weights_and_a_second_export_is_a_no_op():
    import gc
    import weakref

    model, batches = TokenMLP(), _batches()
    result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    handle = apply_masks(model, result)
    dense = weakref.ref(model.fc1.weight)
    x = batches[0][0]
    with torch.no_grad():  # an output's graph would hold the weight
        expected = model(x)
    to_block_sparse(model, result)
    gc.collect()
    kept_whole = [name for name, mask in result.block_masks.items() if mask.all()]  # exported as nn.Linear
    assert not result.block_masks["fc1"].all() and dense() is None
    assert len(handle.masks) == len(kept_whole)  # every other masked layer was exported
    again = to_block_sparse(model, result)
    torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-6)
    other = prune_model(TokenMLP(seed=1), batches, block_size=(8, 8), flops_keep=0.25, exclude=[])
    with pytest.raises(LplError, match="already block-sparse with another mask"):
        to_block_sparse(model, other)


def test_pruning_leaves_every_module_in_the_mode_it_had():
    """A backbone kept in eval mode inside a training wrapper (frozen BatchNorm, say) stays in eval mode."""
    model, batches = TokenMLP(), _batches()
    model.fc1.eval()
    prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert model.training and not model.fc1.training and model.fc2.training


class FlatTable(TokenMLP):
    """A Linear applied to a 2-D table [8, C] the samples share: as long as a batch of 8, it looks per-sample."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, FEATURES))
        self.bias_mlp = nn.Linear(FEATURES, 32)

    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.bias_mlp(self.table).mean(0))
        return self.fc2(torch.tanh(self.fc1(h))).mean(1)


@pytest.mark.parametrize("sizes", [(8, 8, 8), (8, 8, 5), (6, 6)])
def test_a_table_as_long_as_the_batch_is_still_a_table(sizes):
    # the dim holding the samples is measured (a batch twice as large), not guessed from the shape: a table of 8 rows
    # under batches of 8 was calibrated as per-sample rows, and a ragged last batch of 5 then failed
    model = FlatTable()
    batches = [_batches(1, size=size, seed=seed)[0] for seed, size in enumerate(sizes)]
    with pytest.warns(UserWarning, match="without rows per sample"):
        result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert "bias_mlp" not in result.block_masks and "fc1" in result.block_masks


class SequenceFirst(TokenMLP):
    """fc1 on sequence-first tokens [T, B, C] (as OpenAI CLIP's transformer): the same network as TokenMLP."""

    def forward(self, x):
        h = torch.tanh(self.inp(x)).transpose(0, 1)
        h = torch.tanh(self.fc1(h)).transpose(0, 1)
        return self.fc2(h).mean(1)


@pytest.mark.parametrize("batch_size", [2, TOKENS, 3])  # 2 and TOKENS divide the sequence: it looked batch-major
def test_sequence_first_tokens_give_the_statistics_of_batch_first_ones(batch_size):
    batches = _batches(size=batch_size)
    stats = [collect_statistics(model, select_layers(model, ["fc1"], []), batches, (8, 8), module_loss)["fc1"]
             for model in (TokenMLP(), SequenceFirst())]
    torch.testing.assert_close(stats[1].gram, stats[0].gram)
    torch.testing.assert_close(stats[1].first, stats[0].first)


def test_a_compiled_model_is_calibrated_like_the_eager_one():
    # compiled graphs hid the layers' outputs from the hooks' gradients: every statistic was zero, the masks arbitrary
    model, batches = TokenMLP(), _batches()
    compiled = torch.compile(model, backend="aot_eager")

    def loss(network, batch):  # through the compiled forward (module_loss would reach the eager one's `loss`)
        return F.cross_entropy(network(batch[0]), batch[1])

    eager = collect_statistics(model, select_layers(model, None, []), batches, (8, 8), loss)
    stats = collect_statistics(compiled, select_layers(compiled, None, []), batches, (8, 8), loss)
    for name, stat in eager.items():
        torch.testing.assert_close(stats["_orig_mod." + name].gram, stat.gram)


class Captioned(nn.Module):
    """Images and captions (a list of strings the model encodes itself) in one batch dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(FEATURES, 16)
        self.txt = nn.Linear(FEATURES, 16)
        self.out = nn.Linear(16, CLASSES)

    @staticmethod
    def encode(captions: list[str]) -> torch.Tensor:
        return torch.stack([torch.tensor([float(ord(c) % 7) for c in (text * FEATURES)[:FEATURES]])
                            for text in captions])

    def forward(self, image, captions):
        return self.out(torch.tanh(self.img(image) + self.txt(self.encode(captions))))

    def loss(self, batch):
        return F.cross_entropy(self(batch["image"], batch["caption"]), batch["label"])


@pytest.mark.parametrize("size", [4, 1])
def test_a_per_sample_field_that_is_a_list_of_strings_grows_with_the_batch(size):
    # the batch twice as large doubled tensors only: the caption layer looked fed a table and was left dense
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(size, FEATURES, generator=generator),
                "caption": [f"caption {i} of batch {b}" for i in range(size)],
                "label": torch.randint(0, CLASSES, (size,), generator=generator)} for b in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="prune_model: the cost model predicts")  # 8x8 blocks
        result = prune_model(Captioned(), batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert set(result.block_masks) == {"img", "txt", "out"}


class CheckpointedMLP(TokenMLP):
    """TokenMLP whose fc1 runs under activation checkpointing (as timm's set_grad_checkpointing does)."""

    def __init__(self, use_reentrant: bool | None, frozen_input: bool = False) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.inp.requires_grad_(not frozen_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.use_reentrant is not None:
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.fc1(t)), h,
                                                  use_reentrant=self.use_reentrant)
        else:
            h = torch.tanh(self.fc1(h))
        return self.fc2(h).mean(1)


@pytest.mark.parametrize("frozen_input", [False, True])
def test_activation_checkpointing_gives_the_statistics_of_the_plain_forward(frozen_input):
    """The backward runs a checkpointed region's forward again: its layer calls must not be counted twice."""
    batches = _batches()
    stats = {}
    for use_reentrant in (None, False):
        model = CheckpointedMLP(use_reentrant, frozen_input)
        stats[use_reentrant] = collect_statistics(model, select_layers(model, ["fc1", "fc2"], []), batches, (8, 8),
                                                  module_loss)
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(stats[False][name].gram, stats[None][name].gram, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats[False][name].first, stats[None][name].first, rtol=1e-5, atol=1e-7)


def test_layers_no_gradient_reaches_are_named_in_a_warning():
    """Reentrant checkpointing of a region whose input needs no gradient (a frozen input layer) gives its layers
    none: every block would look free to prune."""
    model = CheckpointedMLP(use_reentrant=True, frozen_input=True)
    with pytest.warns(UserWarning, match=r"zero gradient in 1 selected layer\(s\) \(e.g. \['fc1'\]\).*use_reentrant"):
        prune_model(model, _batches(), block_size=8, flops_keep=0.5, include=["fc1", "fc2"], stages=1)


@dataclasses.dataclass
class _TokenBatch:
    tokens: torch.Tensor
    label: torch.Tensor


class DataclassBatches(TokenMLP):
    def loss(self, batch: _TokenBatch):
        return F.cross_entropy(self(batch.tokens), batch.label)


def test_dataclass_batches_give_the_statistics_of_tuple_batches():
    """Lightning moves dataclass batches like tuples; calibration counted no samples in them (refused)."""
    batches = _batches()
    plain, model = TokenMLP(), DataclassBatches()
    expected = collect_statistics(plain, select_layers(plain, ["fc1"], []), batches, (8, 8), module_loss)
    stats = collect_statistics(model, select_layers(model, ["fc1"], []), [_TokenBatch(*b) for b in batches], (8, 8),
                               module_loss)
    torch.testing.assert_close(stats["fc1"].gram, expected["fc1"].gram)
