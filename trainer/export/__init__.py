"""Deployable binary networks: a trained ``bnn`` or ``decoupled`` model exported to an OpenVINO IR
whose binary convolutions run OpenVINO's bit-packed xnor-popcount kernel, verified against PyTorch."""
