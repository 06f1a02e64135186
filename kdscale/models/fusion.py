"""Fusion modules over modality tokens, with a presence mask (docs/students.md, "Any set of
modalities").

Every module takes ``tokens`` [B, M, D] (one token per modality, in the student's modality
order) and ``present`` bool [B, M], and returns ``(fused [B, F], defined bool [B])``. A token of
an absent modality is never read: no imputation. Rows where the fusion is not defined (no
modality; for concat: a modality missing) hold zeros in ``fused``; the student NaNs its head's
logits there.

=========== =================================================================== ==============
fusion      what                                                                defined for
=========== =================================================================== ==============
concat      [t_1, ..., t_M] -> F = M*D                                          all M present
lstm        MedFuse: an LSTM over the PRESENT tokens in order (packed, length    >= 1 present
            = number present), F = hidden size; absent tokens are not in the
            sequence
attention   a learned [FUSE] query token + a modality embedding per token, one   >= 1 present
            pre-norm Transformer encoder layer whose key padding mask hides
            absent tokens; F = D, the [FUSE] output
=========== =================================================================== ==============
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = ["FUSION_KINDS", "ConcatFusion", "LstmFusion", "AttentionFusion", "build_fusion", "compact_present"]

FUSION_KINDS = ("concat", "lstm", "attention")


def compact_present(tokens: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens reordered so each row's present tokens come first, in their original order, and
    the row lengths (number present, at least 1 so packing never sees length 0)."""
    m = tokens.shape[1]
    order_key = (~present).long() * m + torch.arange(m, device=present.device)[None, :]
    order = torch.argsort(order_key, dim=1)
    gathered = torch.gather(tokens, 1, order[:, :, None].expand_as(tokens))
    return gathered, present.sum(1).clamp(min=1)


class ConcatFusion(nn.Module):
    """Concatenation of every modality's token; defined only where all are present (a missing
    modality is not filled in)."""

    def __init__(self, n_modalities: int, token_dim: int):
        super().__init__()
        self.out_dim = n_modalities * token_dim

    def forward(self, tokens: torch.Tensor, present: torch.Tensor):
        defined = present.all(1)
        fused = torch.where(defined[:, None], tokens.flatten(1), torch.zeros((), dtype=tokens.dtype,
                                                                             device=tokens.device))
        return fused, defined


class LstmFusion(nn.Module):
    """MedFuse's LSTM over the present tokens (the MIND student's g_AB input, §1.2). With
    modalities (ehr, image) and token size 256 this is exactly the MIND fusion LSTM."""

    def __init__(self, token_dim: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(token_dim, hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, tokens: torch.Tensor, present: torch.Tensor):
        seq, lengths = compact_present(tokens, present)
        packed = pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        defined = present.any(1)
        return torch.where(defined[:, None], h[-1], torch.zeros_like(h[-1])), defined


class AttentionFusion(nn.Module):
    """Attention over the present modality tokens: a learned [FUSE] token attends to them (and
    they to each other) in one Transformer encoder layer; absent tokens are masked out of the
    keys, so they influence nothing. The [FUSE] token is always a valid key, so no row is fully
    masked (no NaN from an empty softmax)."""

    def __init__(self, n_modalities: int, token_dim: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if token_dim % heads:
            raise ValueError(f"attention fusion: token size {token_dim} is not a multiple of attention_heads {heads}")
        self.fuse_token = nn.Parameter(torch.zeros(1, 1, token_dim))
        self.modality_embedding = nn.Parameter(torch.zeros(1, n_modalities, token_dim))
        nn.init.trunc_normal_(self.fuse_token, std=0.02)
        nn.init.trunc_normal_(self.modality_embedding, std=0.02)
        self.layer = nn.TransformerEncoderLayer(token_dim, heads, dim_feedforward=2 * token_dim, dropout=dropout,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(token_dim)
        self.out_dim = token_dim

    def forward(self, tokens: torch.Tensor, present: torch.Tensor):
        b = tokens.shape[0]
        # absent tokens are zeroed before the embedding is added, then masked out of the keys
        tokens = torch.where(present[:, :, None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        seq = torch.cat([self.fuse_token.expand(b, -1, -1).to(tokens.dtype),
                         tokens + self.modality_embedding.to(tokens.dtype)], dim=1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=present.device), ~present], dim=1)
        out = self.norm(self.layer(seq, src_key_padding_mask=pad)[:, 0])
        defined = present.any(1)
        return torch.where(defined[:, None], out, torch.zeros_like(out)), defined


def build_fusion(kind: str, n_modalities: int, token_dim: int, *, hidden: int = 512, heads: int = 4) -> nn.Module:
    if kind == "concat":
        return ConcatFusion(n_modalities, token_dim)
    if kind == "lstm":
        return LstmFusion(token_dim, hidden)
    if kind == "attention":
        return AttentionFusion(n_modalities, token_dim, heads)
    raise ValueError(f"fusion must be one of {FUSION_KINDS}, got {kind!r}")
