"""Every GPU kernel of tpfleet (Triton and CUDA), one module per family. Nothing here imports from
the packages above it (model, attention, comm, engine): callers pass tensors and sizes."""
