"""Small tensor helpers shared by the transport package."""
import torch as th


def mean_flat(x: th.Tensor) -> th.Tensor:
    """Mean over all dimensions but the first. x: (N, ...) -> (N,)."""
    return th.mean(x, dim=list(range(1, x.dim())))

