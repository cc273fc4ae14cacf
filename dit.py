"""
The DiT score network: a Vision Transformer that denoises images, conditioned on the diffusion
timestep and a class label through adaLN-Zero (Peebles & Xie, "Scalable Diffusion Models with
Transformers", arXiv 2212.09748, Figure 3 and Section 3.2).

This file is only the network. It knows nothing about noise schedules or sampling: it maps
(noisy image x_t, integer timestep t, integer label y) to a tensor of the image's shape (2x the
channels when the variance is learned). What that tensor means (eps, x0 or v) is decided in
diffusion.py.

Read top to bottom:  embeddings -> DiT block -> final layer -> DiT -> presets.
Shapes: N batch, C channels, H = W image size, p patch size, T = (H/p)^2 tokens, D hidden size.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class DiTConfig:
    """Everything needed to rebuild a DiT; checkpoints store it so sample/export need only the file."""
    image_size: int = 32
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1   # label dropout that trains the null class for classifier-free guidance
    learn_sigma: bool = False         # True: also output the variance interpolation v (Improved DDPM, Eq. 15)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by the {self.num_heads} "
                             f"heads and by 4 (the 2-D sin-cos position embedding)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def null_class(self) -> int:
        """The label meaning "no label": one extra row of the label table, used by CFG."""
        return self.num_classes


# ----------------------------------------------------------------------------------------------
#                                  Embeddings of x, t and y
# ----------------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with one (shift, scale) per image broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM and DiT)."""
    # Computed in float32 whatever the model's dtype: t * freq reaches ~1000 rad, where fp16's
    # 3 significant digits would scramble the phase.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)          # (N, dim)


class TimestepEmbedder(nn.Module):
    """Integer timestep -> sinusoidal features -> 2-layer MLP -> D-dim vector."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t):
        freq = timestep_embedding(t, self.frequency_embedding_size)
        # Cast to the weights' dtype so an fp16 model exports a well-typed graph (an fp32 x fp16
        # Gemm slips through torch.onnx and only onnx.checker catches it).
        return self.mlp(freq.to(self.mlp[0].weight.dtype))                 # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> D-dim vector; row `num_classes` is the null class, used when labels are dropped."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, y):
        """Replace a random dropout_prob share of labels by the null class (trains CFG's eps(x, t, null))."""
        drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            y = self.drop_labels(y)
        return self.embedding_table(y)                                     # (N, D)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (MAE): half the channels encode the row, half the column."""
    def sincos_1d(d, pos):                                                 # pos (M,) -> (M, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid_size)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    # The official code embeds its first grid axis (w) in the first half: keep that order.
    emb = torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1)
    return emb.float()                                                     # (T, D)


# ----------------------------------------------------------------------------------------------
#                                         The DiT block
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over the T patch tokens, via PyTorch's fused SDPA kernel."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                  # (N, T, D)
        qkv = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        if torch.is_autocast_enabled(x.device.type):   # bf16 autocast: the attention in fp32
            with torch.autocast(x.device.type, enabled=False):
                x = F.scaled_dot_product_attention(qkv[0].float(), qkv[1].float(), qkv[2].float())
        else:
            x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])         # (N, H, T, D/H)
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))             # (N, T, D)


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear, as in ViT/DiT."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def layer_norm_fp32(x, eps=1e-6):
    """LayerNorm without affine parameters (adaLN supplies them), statistics always in fp32."""
    # A no-op cast for fp32 models; in an fp16 ONNX it becomes Cast->LayerNorm->Cast, the
    # strongly-typed way to keep TensorRT 11 from computing the variance in fp16 (overflow).
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c regresses shift, scale and gate for both halves."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # adaLN-Zero (paper Sec. 3.2): this Linear starts at zero, so every gate is 0 and each block
        # starts as the identity function.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):                                               # x (N, T, D), c (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(layer_norm_fp32(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(layer_norm_fp32(x), shift_mlp, scale_mlp))
        return x                                                           # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear from each token to its p*p*out_channels pixel values."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm_fp32(x), shift, scale))   # (N, T, p*p*C_out)


# ----------------------------------------------------------------------------------------------
#                                            DiT
# ----------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion Transformer: patch embedding + positions -> N adaLN-Zero blocks conditioned on t + y
    -> unpatchify."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.grid_size = config.image_size // config.patch_size
        # Patchify (paper Fig. 4): a conv with stride = kernel = p is a Linear applied to each patch.
        self.x_embedder = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=config.patch_size,
                                    stride=config.patch_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed, not learned: a buffer moves with the model (.to, .half) but is never updated, nor saved.
        pos_embed = sincos_pos_embed_2d(config.hidden_size, self.grid_size)[None]           # (1, T, D)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
                                     for _ in range(config.depth)])
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official DiT initialisation; with the zeroed adaLN and output layers a new DiT outputs
        exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch conv is a Linear on flattened patches: initialise it like one.
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed_patches(self, x):
        """(N, C, H, W) image -> (N, T, D) patch tokens with the fixed position embedding added."""
        x = self.x_embedder(x)                                             # (N, D, H/p, W/p)
        return rearrange(x, "n d gh gw -> n (gh gw) d") + self.pos_embed.to(x.dtype)

    def unpatchify(self, x):
        """(N, T, p*p*C_out) token outputs -> (N, C_out, H, W) image; the inverse of cutting into patches."""
        p, g = self.config.patch_size, self.grid_size
        return rearrange(x, "n (gh gw) (p1 p2 c) -> n c (gh p1) (gw p2)", gh=g, gw=g, p1=p, p2=p)

    def forward(self, x, t, y):
        """x (N, C, H, W) noisy images, t (N,) int timesteps, y (N,) int labels -> (N, C_out, H, W)."""
        h = self.embed_patches(x)                                          # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                        # (N, D) the conditioning vector
        for block in self.blocks:
            h = block(h, c)                                                # (N, T, D)
        return self.unpatchify(self.final_layer(h, c))                     # (N, C_out, H, W)


# ----------------------------------------------------------------------------------------------
#                                           Presets
# ----------------------------------------------------------------------------------------------
# The paper's Table 1 sizes (S/B/L/XL) x patch 2/4/8, here for 32x32 single-channel images
# (change with dataclasses.replace(PRESETS[name], in_channels=3)). DiT-S/8 is the xdiffusion lesson's
# model, with the same parameter count as the official implementation at 1 channel (a test checks it).
# DiT-T/4 is ours: a small model that learns MNIST on a laptop CPU within half an hour.

_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

PRESETS = {
    f"DiT-{size}/{patch}": DiTConfig(hidden_size=d, depth=n, num_heads=h, patch_size=patch)
    for size, (d, n, h) in _SIZES.items() for patch in (2, 4, 8)
}
PRESETS["DiT-T/4"] = DiTConfig(hidden_size=128, depth=6, num_heads=4, patch_size=4)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
