"""Small tensor helpers shared by the transport package."""
import torch as th


def mean_flat(x: th.Tensor) -> th.Tensor:
    """Mean over all dimensions but the first. x: (N, ...) -> (N,)."""
    return th.mean(x, dim=list(range(1, x.dim())))


def bits_per_dim(logp: th.Tensor, num_dims: int) -> th.Tensor:
    """Convert log-likelihoods in nats, (N,), to bits per dimension, (N,)."""
    return -logp / (num_dims * th.log(th.tensor(2.0, dtype=th.float64)).item())
