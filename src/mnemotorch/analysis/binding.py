"""Pairwise binding probes: IsSameObject (Li et al., 2025, "Does Object Binding Naturally Emerge in
Large Pretrained Vision Transformers?", arXiv 2510.24709).

Given the embeddings ``x, y`` (``[C]``) of two patches of one image, a probe predicts whether they
belong to the same object:

* linear              ``sigma(w . x + w . y + b)``            (symmetric: one ``w`` for both)
* diagonal quadratic  ``sigma(w . (x * y) + b)``
* quadratic           ``sigma(x^T W_sym y / sqrt(C) + b)``,  ``W_sym = (W + W^T) / 2``

A linear probe sees each patch separately and so cannot compare them; a quadratic one can. The
probes train on any ViT-like encoder's patch tokens ``[N, P, C]`` with object ids ``[N, P]``, e.g.
``model(pixel_values, output_hidden_states=True).hidden_states[l][:, 1:]`` (CLS token dropped).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PairwiseBindingProbe", "sample_pairs", "synthetic_object_patches"]

KINDS = ("linear", "diagonal", "quadratic")


def _check_tokens(tokens: Tensor, object_ids: Tensor) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or not tokens.is_floating_point():
        raise ValueError(f"tokens must be float patch embeddings [N, P, C], got {getattr(tokens, 'shape', type(tokens))}")
    if not isinstance(object_ids, Tensor) or tuple(object_ids.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"object_ids must be [N, P] = {tuple(tokens.shape[:2])} to match tokens, got {getattr(object_ids, 'shape', type(object_ids))}")
    if object_ids.is_floating_point():
        raise ValueError("object_ids must be an integer tensor")


def synthetic_object_patches(
    n_images: int, *, n_patches: int = 16, n_objects: int = 4, dim: int = 32, noise: float = 0.5, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The spec's synthetic data: each image's patches = its object's random code + noise.

    Every image draws ``n_objects`` fresh codes ``c ~ N(0, I_dim)`` and assigns each of its
    ``n_patches`` patches to an object (each object gets ``n_patches / n_objects`` patches, in a
    random order); a patch is ``c_obj + noise * eps``. Codes are new in every image, so only the
    *relation* between two patches says whether they share an object.

    Returns:
        ``tokens [n_images, n_patches, dim]`` and ``object_ids [n_images, n_patches]``.
    """
    if n_images < 1 or n_patches < 2 or n_objects < 2 or dim < 1 or n_patches % n_objects:
        raise ValueError(f"need n_images >= 1, n_patches >= 2, n_objects >= 2 dividing n_patches, dim >= 1; got "
                         f"{n_images}, {n_patches}, {n_objects}, {dim}")
    g = generator
    codes = torch.randn(n_images, n_objects, dim, generator=g, dtype=torch.float64)
    base = torch.arange(n_objects).repeat_interleave(n_patches // n_objects)
    ids = torch.stack([base[torch.randperm(n_patches, generator=g)] for _ in range(n_images)])
    tokens = torch.gather(codes, 1, ids[..., None].expand(-1, -1, dim)) + noise * torch.randn(n_images, n_patches, dim, generator=g, dtype=torch.float64)
    return tokens.to(dtype), ids


def sample_pairs(object_ids: Tensor, n_pairs: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Balanced pairs of distinct patches from the same image: half same-object, half different.

    Returns ``(image, i, j, same)``, each ``[n_pairs]`` (``same`` is 0/1 float). Images with no
    same-object pair (or no different-object pair) are skipped for that class.
    """
    if object_ids.ndim != 2:
        raise ValueError(f"object_ids must be [N, P], got {tuple(object_ids.shape)}")
    if n_pairs < 2:
        raise ValueError(f"n_pairs must be >= 2, got {n_pairs}")
    n, p = object_ids.shape
    eq = object_ids[:, :, None] == object_ids[:, None, :]
    off = ~torch.eye(p, dtype=torch.bool, device=object_ids.device)
    out = []
    for want, count in ((True, n_pairs - n_pairs // 2), (False, n_pairs // 2)):
        cand = ((eq == want) & off).nonzero()  # [M, 3]: image, i, j
        if cand.shape[0] == 0:
            raise ValueError(f"object_ids has no {'same' if want else 'different'}-object patch pairs")
        pick = cand[torch.randint(cand.shape[0], (count,), generator=generator, device="cpu").to(cand.device)]
        out.append(torch.cat([pick, torch.full((count, 1), int(want), device=pick.device)], dim=1))
    rows = torch.cat(out)
    rows = rows[torch.randperm(rows.shape[0], generator=generator).to(rows.device)]
    return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3].float()


class PairwiseBindingProbe(nn.Module):
    """IsSameObject probe on pairs of patch embeddings.

    Args:
        dim: embedding width ``C``.
        kind: ``"linear"``, ``"diagonal"`` (diagonal quadratic) or ``"quadratic"``.

    ``forward(x [..., C], y [..., C])`` returns logits ``[...]``; :meth:`fit` trains on patch
    tokens and object ids, :meth:`accuracy` scores held-out ones.
    """

    def __init__(self, dim: int, kind: str = "diagonal"):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.dim, self.kind = dim, kind
        self.bias = nn.Parameter(torch.zeros(()))
        if kind == "quadratic":
            self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        else:
            self.weight = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"patch embeddings have dim {x.shape[-1]} but the probe was built for dim={self.dim}")
        w = self.weight.to(x.dtype)
        if self.kind == "linear":
            return (x + y) @ w + self.bias
        if self.kind == "diagonal":
            return (x * y) @ w + self.bias
        sym = (w + w.T) / 2
        return ((x @ sym) * y).sum(-1) / math.sqrt(self.dim) + self.bias

    def _pairs(self, tokens: Tensor, object_ids: Tensor, n_pairs: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        _check_tokens(tokens, object_ids)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens have dim {tokens.shape[-1]} but the probe was built for dim={self.dim}")
        img, i, j, same = sample_pairs(object_ids, n_pairs, generator)
        return tokens[img, i], tokens[img, j], same.to(tokens.device)

    def fit(
        self, tokens: Tensor, object_ids: Tensor, *, steps: int = 300, n_pairs: int = 512, lr: float = 0.05, weight_decay: float = 0.0,
        seed: int = 0,
    ) -> list[float]:
        """Train with Adam on fresh balanced pairs each step (binary cross-entropy). Returns the losses."""
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        self.train()
        for _ in range(steps):
            x, y, same = self._pairs(tokens, object_ids, n_pairs, g)
            loss = F.binary_cross_entropy_with_logits(self(x, y), same.to(x.dtype))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.eval()
        return losses

    @torch.no_grad()
    def accuracy(self, tokens: Tensor, object_ids: Tensor, *, n_pairs: int = 4096, seed: int = 1) -> float:
        """Accuracy on balanced pairs (chance = 0.5)."""
        x, y, same = self._pairs(tokens, object_ids, n_pairs, torch.Generator().manual_seed(seed))
        return float(((self(x, y) > 0).to(same.dtype) == same).double().mean())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}"
