"""Block-sparse layers in traced and exported graphs: jit.trace keeps the kernel's op (saveable), ONNX gets a dense
rebuild of the weight (ONNX has no block-sparse operator), and a traced copy of a masked model replays no masking."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lpl.kernels import BlockSparseLinear
from lpl.prune import PruneResult, apply_masks, to_block_sparse


def _layer(out_features: int = 100, in_features: int = 70) -> BlockSparseLinear:
    torch.manual_seed(0)
    mask = torch.rand(-(-out_features // 16), -(-in_features // 16)) < 0.5
    mask[0, 0] = True
    return BlockSparseLinear.from_linear(nn.Linear(in_features, out_features), mask, (16, 16)).eval()


def _traced(module: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated and warns of its limits
        return torch.jit.trace(module, (x,))


def test_a_jit_trace_calls_the_block_sparse_op_and_survives_save_and_load(rel_err):
    layer = _layer()
    traced = _traced(layer, torch.randn(5, 70))
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "lpl::block_sparse_linear" in kinds and "prim::PythonOp" not in kinds  # a Python Function cannot be saved
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(3, 70)  # another input than the trace's: a constant would not follow it
    with torch.no_grad():
        assert rel_err(loaded(x), layer(x)) < 1e-6


def test_under_onnx_export_the_layer_computes_through_a_dense_rebuild(monkeypatch, rel_err):
    layer = _layer(90, 50)  # ragged edges: the rebuilt weight is cut to the layer's shape
    x = torch.randn(2, 7, 50)
    with torch.no_grad():
        expected = layer(x)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    monkeypatch.setattr("lpl.kernels.ops._dense_onnx_warned", False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(layer, (x,))
    assert sum("ONNX has no block-sparse operator" in str(w.message) for w in caught) == 1
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert not any(kind.startswith("lpl::") for kind in kinds) and "prim::PythonOp" not in kinds
    assert rel_err(traced(x), expected) < 1e-6


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript exporter", "dynamo exporter"])
def test_an_onnx_export_runs_in_onnx_runtime_with_the_layers_outputs(tmp_path, dynamo, rel_err):
    runtime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript" if dynamo else "onnx")
    model = nn.Sequential(_layer(96, 70), nn.GELU(), _layer(40, 96))  # ragged edges: 70 and 40 are not 16k
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 70),), str(path), dynamo=dynamo)
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 70)  # the legacy exporter froze each layer's output for the example input before
    with torch.no_grad():
        expected = model(x)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(out), expected) < 1e-5


def test_a_traced_copy_of_a_masked_model_replays_no_masking(rel_err):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    result = PruneResult({"0": torch.tensor([[True, False], [True, True]])}, (16, 16), {"0": (32, 32)}, 0.75, 0.75,
                         1.0, 1.0)
    apply_masks(model, result)
    copied = copy.deepcopy(model)  # a copy's weights are new tensors: its first call checks them
    traced = _traced(copied, torch.randn(2, 32))
    assert not [node for node in traced.graph.nodes() if node.kind().endswith("_")]  # in-place writes (mul_)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert rel_err(traced(x), model(x)) < 1e-6
    exported = to_block_sparse(copy.deepcopy(model), result)
    with torch.no_grad():
        assert rel_err(_traced(exported, x)(x), model(x)) < 1e-6
