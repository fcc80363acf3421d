"""monet_ref: the float64 reference implementation of Monet (see ../shared/monet-spec.md),
random checkpoint generation, and the PyTorch peer used by benchmarks."""
