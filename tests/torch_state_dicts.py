"""PyTorch state-dict pickles as OpenAI's and Goodfire's SAE code saves them, for the
converter's tests. Written with torch (``torch.save``), weights random with nonzero biases."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray


def openai_state(d_in: int, d_sae: int, *, k: int | None = 8, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> OrderedDict[str, Any]:
    """What ``Autoencoder.state_dict()`` returns (sparse_autoencoder/model.py): tensors named as
    the module names them, the three training buffers, and the activation's entries (TopK with
    ``k``; ``k=None``: a ReLU SAE, whose state dict has ``activation: "ReLU"`` and no
    ``activation_state_dict`` entries)."""
    g = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, Any] = OrderedDict()
    state["pre_bias"] = (torch.randn(d_in, generator=g) * 0.2).to(dtype)
    state["latent_bias"] = (torch.randn(d_sae, generator=g) * 0.1).to(dtype)
    state["encoder.weight"] = (torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5).to(dtype)
    state["decoder.weight"] = (torch.randn(d_in, d_sae, generator=g) / d_sae ** 0.5).to(dtype)
    state["stats_last_nonzero"] = torch.zeros(d_sae, dtype=torch.long)
    state["latents_activation_frequency"] = torch.ones(d_sae)
    state["latents_mean_square"] = torch.zeros(d_sae)
    if k is None:
        state["activation"] = "ReLU"
        state["activation_state_dict"] = OrderedDict()
    else:
        state["activation"] = "TopK"
        state["activation_state_dict"] = OrderedDict(k=k, postact_fn="ReLU")
    return state


def goodfire_state(d_in: int, d_sae: int, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> OrderedDict[str, Any]:
    """What the model card's ``SparseAutoEncoder`` (two ``nn.Linear`` with bias) saves."""
    module = torch.nn.Module()
    torch.manual_seed(seed)
    module.encoder_linear = torch.nn.Linear(d_in, d_sae)
    module.decoder_linear = torch.nn.Linear(d_sae, d_in)
    with torch.no_grad():  # nonzero, not tiny biases: conventions must show
        module.encoder_linear.bias.normal_(0.0, 0.1)
        module.decoder_linear.bias.normal_(0.0, 0.2)
    # state_dict() is an OrderedDict with a _metadata attribute (pickled with BUILD), kept.
    state = cast("OrderedDict[str, Any]", module.to(dtype).state_dict())
    return state


def save(state: Any, path: Path, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, **kwargs)
    return path


def f64(state: OrderedDict[str, Any]) -> dict[str, NDArray[np.float64]]:
    """The state's tensors as float64 arrays (exactly the stored values, widened)."""
    return {k: v.detach().to(torch.float64).numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}
