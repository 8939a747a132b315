"""PyTorch interop for nvfp4-jax (DLPack bridge and ``torch.nn.Module`` wrappers).

Not implemented yet: this package is reserved for the PyTorch bridge (see the project's
issue tracker). Importing it is safe and has no side effects.
"""
