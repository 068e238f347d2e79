"""FastComposer's "postfuse" module: subject image embeddings fused into subject-word text states.

For every marked token with text state t and subject embedding e (docs/methods.md §1.3):
    h  = MLP1([t, e]) + t
    h  = MLP2(h) + h
    t' = LayerNorm(h)
Parameter names match the official checkpoint under `postfuse_module.`.
"""
import torch
from torch import nn


class FusionMLP(nn.Module):
    """fc2(GELU(fc1(LayerNorm(x)))), optionally plus x."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, use_residual: bool):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} -> {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.activation = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.activation(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class FastComposerFusion(nn.Module):
    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.mlp1 = FusionMLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = FusionMLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.layer_norm.normalized_shape[0]

    def fuse_tokens(self, text_states: torch.Tensor, subject_embeds: torch.Tensor) -> torch.Tensor:
        """(..., D) text states of marked tokens and their subject embeddings -> fused states."""
        fused = self.mlp1(torch.cat([text_states, subject_embeds], dim=-1)) + text_states
        return self.layer_norm(self.mlp2(fused))

    def forward(self, text_states: torch.Tensor, subject_positions: torch.Tensor, subject_embeds: torch.Tensor) -> torch.Tensor:
        """Replace the marked tokens of a prompt encoding by their fused states.

        text_states: (B, T, D) text-encoder output; subject_positions: (S,) token indices along T;
        subject_embeds: (S, D), subject i fused into token subject_positions[i] of every batch row.
        """
        if subject_positions.shape[0] != subject_embeds.shape[0]:
            raise ValueError(f"{subject_positions.shape[0]} marked tokens but {subject_embeds.shape[0]} subject embeddings")
        if subject_positions.unique().numel() != subject_positions.numel():
            raise ValueError("two subjects are bound to the same token; give each subject its own word")
        marked = text_states[:, subject_positions]
        embeds = subject_embeds.to(marked.dtype).unsqueeze(0).expand_as(marked)
        fused = text_states.clone()
        fused[:, subject_positions] = self.fuse_tokens(marked, embeds)
        return fused
