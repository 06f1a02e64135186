"""EHR time-series encoders: the MedFuse 2-layer LSTM, a smaller LSTM, and a transformer.

All take ``x`` [B, T, F] (zero-padded) and ``lengths`` [B] and return [B, feature_dim].
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from kdscale.data.ehr import MEDFUSE_EHR_FEATURES


class StackedLSTM(nn.Module):
    """MedFuse's EHR encoder: single-layer LSTMs stacked (``MEDFUSE_EHR_FEATURES`` -> 256 -> 256 by default) on packed
    sequences; the top layer's last hidden state -> dropout.

    Differences from MedFuse, on purpose: the hidden state is indexed, not ``squeeze()``d, so a
    batch of one keeps its batch dimension (pitfall 12); ``dropout`` is applied to the features,
    the only place it has an effect on single-layer LSTMs (pitfall 13).
    """

    def __init__(self, input_dim: int = MEDFUSE_EHR_FEATURES, hidden_dim: int = 256, layers: int = 2, dropout: float = 0.3):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * layers
        self.layers = nn.ModuleList(nn.LSTM(dims[i], dims[i + 1], batch_first=True) for i in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = hidden_dim
        self._init_weights()

    def _init_weights(self) -> None:
        # MedFuse's init: xavier for input weights, orthogonal for recurrent, zero biases.
        for lstm in self.layers:
            for name, param in lstm.named_parameters():
                if "weight_ih" in name:
                    nn.init.xavier_uniform_(param)
                elif "weight_hh" in name:
                    nn.init.orthogonal_(param)
                elif "bias" in name:
                    nn.init.zeros_(param)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.detach().to("cpu", torch.int64).clamp(min=1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        hidden = None
        for lstm in self.layers:
            packed, (hidden, _) = lstm(packed)
        return self.dropout(hidden[-1])  # [B, hidden]: last valid step of each sequence


class EHRTransformer(nn.Module):
    """A small transformer encoder over time steps with a padding mask and masked mean pooling."""

    def __init__(self, input_dim: int = MEDFUSE_EHR_FEATURES, d_model: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, max_len: int = 4096):
        super().__init__()
        self.proj = nn.Linear(input_dim, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.register_buffer("position", _sinusoidal(max_len, d_model), persistent=False)
        self.feature_dim = d_model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        if steps > self.position.shape[0]:
            raise ValueError(f"sequence of {steps} steps exceeds max_len {self.position.shape[0]}")
        pad = torch.arange(steps, device=x.device)[None, :] >= lengths.to(x.device)[:, None]
        h = self.encoder(self.proj(x) + self.position[:steps], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def _sinusoidal(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: dim // 2])
    return table


EHR_ENCODERS = {
    "lstm": lambda input_dim: StackedLSTM(input_dim, 256, 2),        # MedFuse / MIND student
    "lstm_small": lambda input_dim: StackedLSTM(input_dim, 64, 1),
    "transformer": lambda input_dim: EHRTransformer(input_dim),
}


def build_ehr_encoder(name: str, input_dim: int = MEDFUSE_EHR_FEATURES) -> tuple[nn.Module, int]:
    if name not in EHR_ENCODERS:
        raise ValueError(f"unknown EHR encoder {name!r}; choose one of {sorted(EHR_ENCODERS)}")
    model = EHR_ENCODERS[name](input_dim)
    return model, model.feature_dim
