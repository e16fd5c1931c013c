"""lpl: Lightning plug-ins for lean ViTs (block pruning + block-sparse kernels) and training-order science."""

__version__ = "0.1.0"
