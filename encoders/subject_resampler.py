"""The subject encoder: M learned queries resample CLIP vision tokens into M subject tokens (docs/methods.md §2.2).

Input: the patch tokens of ComfyUI's CLIP_VISION output (ViT-L/14: (B, 257, 1024), ViT-H/14: (B, 257, 1280)),
optionally several reference images of one subject, (B, n_images, 257, W). The computation, per image:

    x       = proj_in(image_tokens [+ P[:n]])          P: optional learned positions (n <= position_embeddings)
    queries = [pooled_queries(mean_n x) ;] queries      optional: tokens from the mean image token, put first
    per block: queries += to_out(attend(to_q(LN_q queries), to_kv([LN_x x ; LN_q queries])))
               queries += W_2 GELU(W_1 LN(queries))                                        (no biases)
    tokens  = base_token + proj_out(norm_out(queries))
            = base_token + norm_out(proj_out(queries))  with norm_after_projection (IP-Adapter's order)

`attend` is multi-head attention with scale 1/sqrt(head size); the queries see the image and themselves in one
softmax (Perceiver / IP-Adapter-Plus resamplers). Its width `attention_width` = heads * head size may differ from
the queries' `width` (IP-Adapter's PerceiverAttention: inner dim = heads * dim_head). The optional parts
(positions, pooled queries) are IP-Adapter resampler.py's `pos_emb` and `to_latents_from_mean_pooled_seq`,
computed as there. With `proj_out` zero-initialised every token starts at `base_token` (the trainer sets it to the
initializer word's context vector). An optional identity branch maps an ArcFace embedding (B, 512) to extra
tokens appended to the output.
"""
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint_io import numbered_children

MAX_QUERIES = 256
_SIZES = ("vision_width", "num_queries", "depth", "width", "heads", "output_width", "ff_mult")
_COUNTS = ("identity_tokens", "pooled_queries", "position_embeddings")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ResamplerConfig:
    vision_width: int = 1024            # CLIP vision hidden width: 1024 ViT-L/14, 1280 ViT-H/14
    num_queries: int = 16               # M learned queries = subject tokens per image
    depth: int = 4
    width: int = 768                    # internal width of the queries
    heads: int = 12
    output_width: int = 768             # D = the base model's context width (768 sd15, 2048 sdxl)
    ff_mult: int = 4
    identity_width: int | None = None   # 512 for an ArcFace embedding; None: no identity branch
    identity_tokens: int = 0
    norm_after_projection: bool = False  # True: out = base + LN(proj_out(q)), the IP-Adapter-Plus order (imports)
    attention_width: int | None = None  # heads * head size of the blocks' attention; None: the same as width
    pooled_queries: int = 0             # extra leading queries made from the mean image token (IP-Adapter option)
    position_embeddings: int = 0        # learned positions for up to this many image tokens; 0: none

    def __post_init__(self) -> None:
        for name in _SIZES:
            if not (_is_integer(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in _COUNTS:
            if not (_is_integer(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (self.attention_width is None or _is_integer(self.attention_width) and self.attention_width >= 1):
            raise ValueError(f"attention_width must be a positive integer or None, got {self.attention_width!r}")
        if self.attention_width == self.width:  # one spelling per config, so configs compare equal
            self.attention_width = None
        if not (self.identity_width is None or _is_integer(self.identity_width) and self.identity_width >= 1):
            raise ValueError(f"identity_width must be a positive integer or None, got {self.identity_width!r}")
        if not isinstance(self.norm_after_projection, bool):
            raise ValueError(f"norm_after_projection must be true or false, got {self.norm_after_projection!r}")
        if not 1 <= self.num_queries <= MAX_QUERIES:
            raise ValueError(f"num_queries must be in 1..{MAX_QUERIES}, got {self.num_queries}")
        if self.tokens > MAX_QUERIES:
            raise ValueError(f"num_queries + pooled_queries must be at most {MAX_QUERIES}, got {self.tokens}")
        if self.inner_width % self.heads:
            raise ValueError(f"attention width {self.inner_width} is not divisible by heads {self.heads}")
        if (self.identity_width is None) != (self.identity_tokens == 0):
            raise ValueError(f"identity_width ({self.identity_width}) and identity_tokens ({self.identity_tokens}) "
                             f"must be set together")

    @property
    def inner_width(self) -> int:
        """heads * head size of the blocks' attention."""
        return self.width if self.attention_width is None else self.attention_width

    @property
    def tokens(self) -> int:
        """Output tokens per image, before identity tokens."""
        return self.pooled_queries + self.num_queries

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ResamplerConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown resampler config fields: {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], heads: int, norm_after_projection: bool = False,
                    prefix: str = "") -> "ResamplerConfig":
        """The config of the SubjectResampler whose state-dict shapes are those under `prefix`: every size is read from
        a weight, depth is the number of complete blocks present; heads and the norm order do not show in shapes.
        Raises ValueError naming a missing or misshapen tensor."""
        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if prefix + key not in shapes or len(shapes[prefix + key]) != ndim:
                raise ValueError(f"tensor {prefix}{key} is missing or not {ndim}-dimensional")
            return tuple(shapes[prefix + key])

        def present(key: str) -> bool:
            return prefix + key in shapes

        _, num_queries, width = shape("queries", 3)
        output_width = shape("proj_out.weight", 2)[0]
        sizes = dict(vision_width=shape("proj_in.weight", 2)[1], num_queries=num_queries, width=width, heads=heads,
                     output_width=output_width, ff_mult=shape("blocks.0.1.1.weight", 2)[0] // max(width, 1),
                     identity_width=shape("identity.1.weight", 2)[1] if present("identity.1.weight") else None,
                     identity_tokens=shape("identity.3.weight", 2)[0] // max(output_width, 1)
                     if present("identity.1.weight") else 0,
                     norm_after_projection=norm_after_projection,
                     attention_width=shape("blocks.0.0.to_q.weight", 2)[0],
                     pooled_queries=shape("pooled_queries.1.weight", 2)[0] // max(width, 1)
                     if present("pooled_queries.1.weight") else 0,
                     position_embeddings=shape("position_embedding.weight", 2)[0]
                     if present("position_embedding.weight") else 0)
        with torch.device("meta"):  # shapes only
            block = {key: tuple(value.shape) for key, value in resampler_block(cls(depth=1, **sizes)).state_dict().items()}
        return cls(depth=numbered_children(shapes, prefix + "blocks.", block), **sizes)


class FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int):
        super().__init__(nn.LayerNorm(width), nn.Linear(width, width * mult, bias=False), nn.GELU(),
                         nn.Linear(width * mult, width, bias=False))


class QueryAttention(nn.Module):
    """Queries attend to [image tokens; queries]; pre-LayerNorm on both, no biases; inner width heads * head size."""

    def __init__(self, width: int, heads: int, inner_width: int):
        super().__init__()
        self.heads = heads
        self.norm_image = nn.LayerNorm(width)
        self.norm_queries = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner_width, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner_width, bias=False)
        self.to_out = nn.Linear(inner_width, width, bias=False)

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        queries = self.norm_queries(queries)
        context = torch.cat([self.norm_image(image), queries], dim=1)
        q = rearrange(self.to_q(queries), "b m (h d) -> b h m d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h m d -> b m (h d)"))


def resampler_block(config: ResamplerConfig) -> nn.ModuleList:
    """One block: the queries' attention, then their feed-forward."""
    return nn.ModuleList([QueryAttention(config.width, config.heads, config.inner_width),
                          FeedForward(config.width, config.ff_mult)])


class SubjectResampler(nn.Module):
    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        c = config
        self.queries = nn.Parameter(torch.randn(1, c.num_queries, c.width) / c.width ** 0.5)
        self.proj_in = nn.Linear(c.vision_width, c.width)
        self.blocks = nn.ModuleList(resampler_block(c) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.output_width if c.norm_after_projection else c.width)
        self.proj_out = nn.Linear(c.width, c.output_width)
        self.base_token = nn.Parameter(torch.zeros(c.output_width))
        if c.identity_width is not None:
            self.identity = nn.Sequential(nn.LayerNorm(c.identity_width), nn.Linear(c.identity_width, c.width),
                                          nn.GELU(), nn.Linear(c.width, c.identity_tokens * c.output_width))
        if c.position_embeddings:
            self.position_embedding = nn.Embedding(c.position_embeddings, c.vision_width)
        if c.pooled_queries:
            self.pooled_queries = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.pooled_queries * c.width))

    def _encode(self, image_tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.position_embeddings:
            if image_tokens.shape[1] > c.position_embeddings:
                raise ValueError(f"this encoder has learned positions for {c.position_embeddings} image tokens, "
                                 f"got {image_tokens.shape[1]}")
            image_tokens = image_tokens + self.position_embedding.weight[:image_tokens.shape[1]]
        image = self.proj_in(image_tokens)
        queries = self.queries.expand(image.shape[0], -1, -1)
        if c.pooled_queries:  # IP-Adapter: LayerNorm + Linear of the mean projected image token, put before the queries
            pooled = self.pooled_queries(image.mean(dim=1)).unflatten(-1, (c.pooled_queries, c.width))
            queries = torch.cat([pooled, queries], dim=1)
        for attention, feed_forward in self.blocks:
            queries = queries + attention(image, queries)
            queries = queries + feed_forward(queries)
        if self.config.norm_after_projection:
            return self.base_token + self.norm_out(self.proj_out(queries))
        return self.base_token + self.proj_out(self.norm_out(queries))

    def forward(self, image_tokens: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 257, W) or (B, n_images, 257, W) [+ identity (B, 512) or (B, n_images, 512)] -> (B, M [+ I], D),
        M = pooled_queries + num_queries."""
        c = self.config
        if image_tokens.shape[-1] != c.vision_width:
            raise ValueError(f"this encoder expects {c.vision_width}-wide CLIP vision tokens, "
                             f"got {image_tokens.shape[-1]}-wide")
        if image_tokens.ndim == 3:
            image_tokens = image_tokens.unsqueeze(1)
        batch, n_images = image_tokens.shape[:2]
        tokens = self._encode(image_tokens.flatten(0, 1)).view(batch, n_images, c.tokens, c.output_width)
        # Average outputs, not CLIP tokens: each image then stays on the encoder's training distribution.
        tokens = tokens.mean(dim=1)
        if (identity is None) != (c.identity_width is None):
            raise ValueError("this encoder " + ("needs an ArcFace identity embedding" if identity is None
                                                else "has no identity branch, but an identity embedding was given"))
        if identity is None:
            return tokens
        extra = self.base_token + self.identity(identity).unflatten(-1, (c.identity_tokens, c.output_width))
        if extra.ndim == 4:
            extra = extra.mean(dim=1)  # several images: average like the image tokens
        return torch.cat([tokens, extra], dim=1)
