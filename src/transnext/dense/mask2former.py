"""Mask2Former for semantic segmentation on a TransNeXt trunk, as in the reference ADE20K configs.

The head is the one the published ``mask2former_transnext_*_160k_ade20k-512x512`` checkpoints were
trained with (mmseg 1.x around mmdet 3's ``Mask2FormerHead``), written out in plain PyTorch:

* pixel decoder: 1x1 conv + GroupNorm projections of the three coarsest maps (strides 32, 16, 8),
  6 deformable-attention encoder layers over them (post-norm, FFN 1024), then an FPN step to stride 4
  (1x1 lateral conv + GN, 3x3 output conv + GN + ReLU) and a 1x1 ``mask_feature`` conv;
* transformer decoder: 9 layers of masked cross-attention, self-attention and FFN (2048), each on
  the next level (32, 16, 8, 32 ...); a query attends only where the previous layer's mask has
  sigmoid >= 0.5, and a query whose mask is empty everywhere attends everywhere;
* 100 learned queries, a class head with a "no object" class and a 3-layer mask-embedding MLP;
  masks are the dot products of the mask embeddings with the stride-4 mask features;
* training: for every decoder output (the initial queries' prediction and each layer's), Hungarian
  matching of queries to the classes present in the label map on point-sampled costs (class 2,
  mask BCE 5, dice 5), then class cross-entropy (weight 2, "no object" 0.1) and point-sampled mask
  BCE (5) + dice (5) on 12,544 points per mask chosen by importance sampling (3x oversampling, 75%
  most uncertain);
* inference: softmax class scores (without "no object") times sigmoid masks, summed over queries,
  at the input size.

transformers' ``Mask2FormerForUniversalSegmentation`` is not used: it is a large extra dependency
whose parameter layout differs from the published checkpoints', and this module reuses the
project's multi-scale deformable attention (:mod:`transnext.dense.deformable_attention`). Submodule
names follow the reference head's, so a published checkpoint's ``decode_head.*`` keys load unchanged
(:func:`convert_mmdet_mask2former`).

Random draws (the matching points and the importance sampling) go through ``rand`` arguments, so
that a test can inject the reference's points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import TransNeXtBackbone
from .deformable_attention import MultiScaleDeformableAttention
from .matching import hungarian_match, mean_over_processes
from .transformer_layers import FFN, Attention, ConvGN, DeformableEncoderLayer

__all__ = [
    "Mask2Former",
    "Mask2FormerHead",
    "Mask2FormerLoss",
    "MSDeformAttnPixelDecoder",
    "convert_mmdet_mask2former",
    "mask2former_transnext",
    "point_sample",
    "semantic_inference",
    "semantic_to_instances",
    "sine_position_encoding",
    "uncertain_point_coords",
]

RandFn = Callable[..., Tensor]  # rand(*shape, device=...) -> uniform [0, 1) samples
_F32_EPS = torch.finfo(torch.float32).eps  # the reference adds it to every loss denominator


# ---------------------------------------------------------------------------------------- building blocks
def sine_position_encoding(height: int, width: int, num_feats: int, device: torch.device | None = None,
                           dtype: torch.dtype = torch.float32, temperature: float = 10000.0, eps: float = 1e-6) -> Tensor:
    """DETR's normalised sine encoding of an unpadded ``height x width`` grid: ``[2 * num_feats, H, W]`` (y then x)."""
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * scale
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(v: Tensor) -> Tensor:  # [n] -> [n, num_feats], sin on even channels, cos on odd ones
        p = v[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).to(dtype)


# ---------------------------------------------------------------------------------------- pixel decoder
class PixelDecoderEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes)
        return x


def _reference_points(shapes: list[tuple[int, int]], strides: Sequence[int], batch: int, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    """Normalised pixel centres of every level, ``[B, S, levels, 2]`` as ``(x, y)``.

    Computed in float32 as image coordinates over the image size, like the reference, so that both
    give the same numbers to the last bit.
    """
    pts = []
    for (h, w), s in zip(shapes, strides):
        f32 = torch.float32
        ys, xs = torch.meshgrid((torch.arange(h, device=device, dtype=f32) + 0.5) * s / (h * s),
                                (torch.arange(w, device=device, dtype=f32) + 0.5) * s / (w * s), indexing="ij")
        pts.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    ref = torch.cat(pts, 0).to(dtype)
    return ref[None, :, None, :].expand(batch, ref.shape[0], len(shapes), 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over the coarsest ``num_levels`` maps + FPN steps down to the finest map.

    ``forward(feats)`` (finest first) -> ``(mask_features [B, out, H/4, W/4], [maps coarsest first])``.
    """

    def __init__(self, in_channels: Sequence[int], feat_channels: int = 256, out_channels: int = 256, num_levels: int = 3,
                 num_layers: int = 6, num_heads: int = 8, num_points: int = 4, ffn_dims: int = 1024, dropout: float = 0.0,
                 num_groups: int = 32, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(strides) != len(in_channels):
            raise ValueError(f"one stride per input map: {len(in_channels)} maps, strides {tuple(strides)}")
        self.strides = tuple(int(s) for s in strides)
        if not 1 <= num_levels <= len(in_channels):
            raise ValueError(f"num_levels must be between 1 and the number of input maps ({len(in_channels)}), got {num_levels}")
        if feat_channels % 2:
            raise ValueError(f"feat_channels must be even (half for y, half for x in the position encoding), got {feat_channels}")
        self.num_inputs, self.num_levels = len(in_channels), num_levels
        self.feat_channels = feat_channels
        # coarsest first
        self.input_convs = nn.ModuleList(ConvGN(in_channels[i], feat_channels, 1, bias=True, groups=num_groups)
                                         for i in range(self.num_inputs - 1, self.num_inputs - num_levels - 1, -1))
        self.encoder = PixelDecoderEncoder(num_layers, embed_dims=feat_channels, num_heads=num_heads, num_levels=num_levels,
                                           num_points=num_points, ffn_dims=ffn_dims, dropout=dropout)
        self.level_encoding = nn.Embedding(num_levels, feat_channels)
        # the maps below the encoder's levels, coarsest first as in the reference (index i = input map i)
        finer = range(self.num_inputs - num_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList(ConvGN(in_channels[i], feat_channels, 1, groups=num_groups) for i in finer)
        self.output_convs = nn.ModuleList(ConvGN(feat_channels, feat_channels, 3, relu=True, groups=num_groups) for _ in finer)
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: Xavier convs with zero bias, N(0, 1) level encodings, Xavier-normal encoder."""
        for m in self.input_convs:
            nn.init.xavier_uniform_(m.conv.weight)
            nn.init.zeros_(m.conv.bias)
        for m in [*(c.conv for c in self.lateral_convs), *(c.conv for c in self.output_convs), self.mask_feature]:
            nn.init.kaiming_uniform_(m.weight, a=1)  # caffe2's Xavier fill
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for m in self.encoder.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if len(feats) != self.num_inputs:
            raise ValueError(f"the pixel decoder takes {self.num_inputs} maps (finest first), got {len(feats)}")
        batch = feats[0].shape[0]
        tokens, pos, shapes = [], [], []
        for i in range(self.num_levels):
            f = feats[self.num_inputs - 1 - i]
            h, w = f.shape[-2:]
            x = self.input_convs[i](f)
            p = sine_position_encoding(h, w, self.feat_channels // 2, f.device, x.dtype) + self.level_encoding.weight[i].view(-1, 1, 1)
            tokens.append(x.flatten(2).transpose(1, 2))
            pos.append(p.flatten(1).transpose(0, 1)[None].expand(batch, -1, -1))
            shapes.append((int(h), int(w)))
        x = torch.cat(tokens, 1)
        ref = _reference_points(shapes, [self.strides[self.num_inputs - 1 - i] for i in range(self.num_levels)], batch, x.device,
                                x.dtype)
        memory = self.encoder(x, torch.cat(pos, 1), ref, shapes)
        outs = [m.transpose(1, 2).reshape(batch, -1, h, w) for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1), shapes)]
        for j, i in enumerate(range(self.num_inputs - self.num_levels - 1, -1, -1)):
            lat = self.lateral_convs[j](feats[i])
            y = lat + F.interpolate(outs[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[j](y))
        return self.mask_feature(outs[-1]), outs[:self.num_levels]


# ---------------------------------------------------------------------------------------- transformer decoder
class Mask2FormerDecoderLayer(nn.Module):
    """Masked cross-attention to one level, self-attention among the queries, FFN; post-norm after each."""

    def __init__(self, dims: int, num_heads: int, ffn_dims: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.cross_attn = Attention(dims, num_heads, dropout)
        self.self_attn = Attention(dims, num_heads, dropout)
        self.ffn = FFN(dims, ffn_dims, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(dims) for _ in range(3))

    def forward(self, query: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor, attn_mask: Tensor | None) -> Tensor:
        query = self.norms[0](self.cross_attn(query, memory, memory, query_pos, memory_pos, attn_mask))
        query = self.norms[1](self.self_attn(query, query_pos=query_pos))
        return self.norms[2](self.ffn(query))


class Mask2FormerTransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, dims: int, num_heads: int, ffn_dims: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Mask2FormerDecoderLayer(dims, num_heads, ffn_dims, dropout) for _ in range(num_layers))
        self.post_norm = nn.LayerNorm(dims)


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention decoder + class / mask predictions after every layer.

    ``forward(feats)`` -> ``(class logits, mask logits)``: lists with one entry per decoder output
    (``num_layers + 1``: the initial queries' prediction first), ``[B, Q, classes + 1]`` and
    ``[B, Q, H/4, W/4]``.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, feat_channels: int = 256, out_channels: int = 256,
                 num_queries: int = 100, num_levels: int = 3, encoder_layers: int = 6, encoder_ffn_dims: int = 1024,
                 decoder_layers: int = 9, decoder_ffn_dims: int = 2048, num_heads: int = 8, num_points: int = 4,
                 dropout: float = 0.0, num_groups: int = 32, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("num_queries", num_queries), ("decoder_layers", decoder_layers),
                        ("encoder_layers", encoder_layers)):
            if v < (0 if name == "encoder_layers" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'encoder_layers' else 1}, got {v}")
        if feat_channels % num_heads:
            raise ValueError(f"feat_channels ({feat_channels}) must be divisible by num_heads ({num_heads})")
        self.num_classes, self.num_queries, self.num_heads, self.num_levels = num_classes, num_queries, num_heads, num_levels
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, feat_channels, out_channels, num_levels, encoder_layers, num_heads,
                                                      num_points, encoder_ffn_dims, dropout, num_groups, strides)
        self.transformer_decoder = Mask2FormerTransformerDecoder(decoder_layers, feat_channels, num_heads, decoder_ffn_dims, dropout)
        self.query_embed = nn.Embedding(num_queries, feat_channels)
        self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(num_levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, out_channels))
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def _predict(self, query: Tensor, mask_features: Tensor, mask_size: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Class and mask logits of the queries, and the next layer's attention mask (True = not attended)."""
        q = self.transformer_decoder.post_norm(query)
        cls = self.cls_embed(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        attn = F.interpolate(masks, size=tuple(mask_size), mode="bilinear", align_corners=False)
        attn = (attn.flatten(2).sigmoid() < 0.5).detach()
        # a query that would see nothing sees everything (softmax over no key is undefined)
        attn = attn & ~attn.all(-1, keepdim=True)
        return cls, masks, attn.repeat_interleave(self.num_heads, dim=0)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        mask_features, levels = self.pixel_decoder(feats)
        batch = mask_features.shape[0]
        memories, positions = [], []
        for i, m in enumerate(levels):
            memories.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            pos = sine_position_encoding(m.shape[-2], m.shape[-1], m.shape[1] // 2, m.device, m.dtype)
            positions.append(pos.flatten(1).transpose(0, 1)[None].expand(batch, -1, -1))
        query = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        cls, masks, attn = self._predict(query, mask_features, levels[0].shape[-2:])
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.transformer_decoder.layers):
            lvl = i % self.num_levels
            query = layer(query, memories[lvl], query_pos, positions[lvl], attn)
            cls, masks, attn = self._predict(query, mask_features, levels[(i + 1) % self.num_levels].shape[-2:])
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks


# ---------------------------------------------------------------------------------------- losses
def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of ``maps`` ``[N, C, H, W]`` at ``points`` ``[N, P, 2]`` (``(x, y)`` in ``[0, 1]``): ``[N, C, P]``."""
    return F.grid_sample(maps, 2.0 * points[:, :, None, :] - 1.0, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


def uncertain_point_coords(mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float,
                           rand: RandFn = torch.rand) -> Tensor:
    """PointRend's training points: of ``oversample_ratio * num_points`` uniform points, the ``importance_ratio``
    share closest to the decision boundary (smallest ``|logit|``), plus fresh uniform points; ``[N, num_points, 2]``."""
    n = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = rand(n, num_sampled, 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, coords.to(mask_logits.dtype))[:, 0].abs()
    k = int(importance_ratio * num_points)
    idx = uncertainty.topk(k, dim=1)[1]
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_points - k > 0:
        coords = torch.cat((coords, rand(n, num_points - k, 2, device=mask_logits.device)), 1)
    return coords


def semantic_to_instances(label: Tensor, num_classes: int, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """``(classes present [G], their binary masks [G, H, W])`` of one ``H x W`` label map (ignored pixels in none)."""
    if label.dim() != 2:
        raise ValueError(f"a label map must be H x W, got shape {tuple(label.shape)}")
    if label.is_floating_point():
        raise ValueError(f"label maps must hold integer class ids, got dtype {label.dtype}")
    classes = torch.unique(label)
    classes = classes[classes != ignore_index]
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise ValueError(f"label map holds class ids {bad.tolist()} outside 0..{num_classes - 1} (ignore index {ignore_index}); "
                         "check num_classes and the data format (ADE20K's zero reduction)")
    return classes, label[None] == classes[:, None, None]


class Mask2FormerLoss(nn.Module):
    """Hungarian matching + class / mask / dice losses for every decoder output (the reference's weights and sampling)."""

    def __init__(self, num_classes: int, num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if num_points < 1 or oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"point sampling needs num_points >= 1, oversample_ratio >= 1 and importance_sample_ratio in [0, 1], "
                             f"got {num_points}, {oversample_ratio}, {importance_sample_ratio}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.num_points, self.oversample_ratio, self.importance_sample_ratio = num_points, oversample_ratio, importance_sample_ratio
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.register_buffer("empty_weight", torch.tensor([1.0] * num_classes + [no_object_weight]), persistent=False)

    @torch.no_grad()
    def match(self, cls: Tensor, masks: Tensor, gt_labels: Tensor, gt_masks: Tensor, rand: RandFn = torch.rand) -> tuple[Tensor, Tensor]:
        """``(query indices, gt indices)`` of one image, sorted by query, minimising the point-sampled cost."""
        pts = rand(1, self.num_points, 2, device=cls.device).to(masks.dtype)  # drawn even without targets: one stream
        if gt_labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=cls.device)
            return empty, empty
        pred = point_sample(masks[:, None], pts.expand(masks.shape[0], -1, -1))[:, 0]
        tgt = point_sample(gt_masks[:, None].to(masks.dtype), pts.expand(gt_masks.shape[0], -1, -1))[:, 0]
        cost_cls = -cls.softmax(-1)[:, gt_labels]
        pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
        neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
        cost_mask = (pos @ tgt.T + neg @ (1 - tgt).T) / pred.shape[1]
        prob = pred.sigmoid()
        cost_dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
        cost = self.class_weight * cost_cls + self.mask_weight * cost_mask + self.dice_weight * cost_dice
        rows, cols = hungarian_match(cost)
        return rows.to(cls.device), cols.to(cls.device)

    def layer_loss(self, cls: Tensor, masks: Tensor, targets: list[tuple[Tensor, Tensor]], rand: RandFn = torch.rand
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """``(class, mask, dice)`` losses of one decoder output (weights applied)."""
        batch, num_queries = cls.shape[:2]
        labels = torch.full((batch, num_queries), self.num_classes, dtype=torch.long, device=cls.device)
        picked, target_masks = [], []
        for b, (gt_labels, gt_masks) in enumerate(targets):
            rows, cols = self.match(cls[b], masks[b], gt_labels, gt_masks, rand)
            labels[b, rows] = gt_labels[cols]
            picked.append(masks[b, rows])
            target_masks.append(gt_masks[cols])
        weight = self.empty_weight.to(cls.dtype)
        loss_cls = F.cross_entropy(cls.flatten(0, 1), labels.flatten(), weight=weight, reduction="sum")
        loss_cls = self.class_weight * loss_cls / (weight[labels].sum() + _F32_EPS)
        pred = torch.cat(picked, 0)
        # the reference's normaliser: matched masks per image, at least 1 per image, averaged over processes
        per_image = sum(max(min(t[0].numel(), num_queries), 1) for t in targets)
        num_masks = max(mean_over_processes(float(per_image), cls.device), 1.0)
        if pred.shape[0] == 0:  # nothing to match: zero with a graph
            return loss_cls, masks[:0].sum(), masks[:0].sum()
        gt = torch.cat(target_masks, 0)
        with torch.no_grad():
            pts = uncertain_point_coords(pred[:, None], self.num_points, self.oversample_ratio, self.importance_sample_ratio, rand)
            pts = pts.to(pred.dtype)
            tgt = point_sample(gt[:, None].to(pred.dtype), pts)[:, 0]
        logits = point_sample(pred[:, None], pts)[:, 0]
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * tgt).sum(-1) + 1) / (prob.sum(-1) + tgt.sum(-1) + 1)
        loss_dice = self.dice_weight * dice.sum() / (num_masks + _F32_EPS)
        bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="sum")
        loss_mask = self.mask_weight * bce / (num_masks * self.num_points + _F32_EPS)
        return loss_cls, loss_mask, loss_dice

    def forward(self, all_cls: Sequence[Tensor], all_masks: Sequence[Tensor], labels: Tensor | Sequence[Tensor],
                rand: RandFn = torch.rand) -> dict[str, Tensor]:
        """Per-output losses in the reference's names: ``loss_cls`` / ``loss_mask`` / ``loss_dice`` of the last output,
        ``d{i}.loss_*`` of the earlier ones. ``labels``: ``[B, H, W]`` label maps (any size; ``ignore_index`` = no class)."""
        if len(labels) != all_cls[0].shape[0]:
            raise ValueError(f"{len(labels)} label maps for a batch of {all_cls[0].shape[0]} images")
        targets = [semantic_to_instances(lab, self.num_classes, self.ignore_index) for lab in labels]
        out: dict[str, Tensor] = {}
        n = len(all_cls)
        for i, (cls, masks) in enumerate(zip(all_cls, all_masks)):
            lc, lm, ld = self.layer_loss(cls.float(), masks.float(), targets, rand)
            prefix = "" if i == n - 1 else f"d{i}."
            out[prefix + "loss_cls"], out[prefix + "loss_mask"], out[prefix + "loss_dice"] = lc, lm, ld
        return out


def semantic_inference(cls: Tensor, masks: Tensor, size: Sequence[int]) -> Tensor:
    """Class scores ``[B, classes, *size]``: softmax class probabilities (no "no object") x sigmoid masks, summed over queries."""
    # in float32 even under autocast: a bf16 sum over the queries would round class scores into ties
    def wide(t: Tensor) -> Tensor:
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    with torch.autocast(masks.device.type, enabled=False):
        masks = F.interpolate(wide(masks), size=tuple(size), mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", wide(cls).softmax(-1)[..., :-1], masks.sigmoid())


# ---------------------------------------------------------------------------------------- model
class Mask2Former(nn.Module):
    """Backbone + :class:`Mask2FormerHead` (attribute ``decode_head``, as in the reference checkpoints).

    ``forward(x)`` -> class scores ``[B, num_classes, H, W]`` at the input size (what the segmentation
    inference modes read); ``forward(x, labels)`` -> the loss dict (``loss`` = the sum, ``loss_cls``,
    ``loss_mask``, ``loss_dice`` of the last decoder output, ``loss_aux`` = the earlier outputs' sum).
    """

    def __init__(self, backbone: TransNeXtBackbone, num_classes: int, ignore_index: int = 255,
                 loss_kwargs: Mapping[str, Any] | None = None, **head_kwargs: Any) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        backbone.return_dict = False
        self.backbone = backbone
        self.num_classes = num_classes
        head_kwargs.setdefault("strides", tuple(backbone.strides))
        self.decode_head = Mask2FormerHead(backbone.out_channels, num_classes, **head_kwargs)
        self.criterion = Mask2FormerLoss(num_classes, ignore_index=ignore_index, **dict(loss_kwargs or {}))

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        """Parameters the reference trains without weight decay besides the trunk's (its ``embed_mult`` keys)."""
        return ("decode_head.query_embed", "decode_head.query_feat", "decode_head.level_embed")

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Mask2Former expects images [batch, 3, height, width], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"images must be at least 32 x 32 pixels (the stride-32 map), got {tuple(x.shape[-2:])}")

    def forward_head(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Class and mask logits of every decoder output (see :class:`Mask2FormerHead`)."""
        self._check(x)
        return self.decode_head(self.backbone(x))

    def loss(self, x: Tensor, labels: Tensor | Sequence[Tensor], rand: RandFn = torch.rand) -> dict[str, Tensor]:
        """The per-output losses in the reference's names (see :meth:`Mask2FormerLoss.forward`)."""
        all_cls, all_masks = self.forward_head(x)
        return self.criterion(all_cls, all_masks, labels, rand)

    def forward(self, x: Tensor, labels: Tensor | Sequence[Tensor] | None = None) -> Tensor | dict[str, Tensor]:
        if labels is None:
            all_cls, all_masks = self.forward_head(x)
            return semantic_inference(all_cls[-1].float(), all_masks[-1].float(), x.shape[-2:])
        if isinstance(labels, Tensor) and (labels.dim() != 3 or labels.shape[0] != x.shape[0]):
            raise ValueError(f"labels must be [batch, height, width] label maps matching {x.shape[0]} images, got {tuple(labels.shape)}")
        full = self.loss(x, labels)
        out = {k: full[k] for k in ("loss_cls", "loss_mask", "loss_dice")}
        aux = [v for k, v in full.items() if k.startswith("d")]
        out["loss_aux"] = torch.stack(aux).sum() if aux else out["loss_cls"] * 0.0
        out["loss"] = out["loss_cls"] + out["loss_mask"] + out["loss_dice"] + out["loss_aux"]
        return out


def mask2former_transnext(
    variant: str = "transnext_tiny",
    num_classes: int = 150,
    backbone_weights: str | Path | bool | None = None,
    preset: str | None = "mask2former",
    frozen_stages: int = -1,
    num_queries: int = 100,
    feat_channels: int = 256,
    decoder_layers: int = 9,
    encoder_layers: int = 6,
    ignore_index: int = 255,
    head_kwargs: Mapping[str, Any] | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> Mask2Former:
    """Mask2Former on a TransNeXt trunk with the reference settings (``mask2former_transnext_*_160k_ade20k-512x512``).

    Args:
        variant: TransNeXt variant (``transnext_tiny`` ...).
        num_classes: output classes without "no object" (ADE20K: 150).
        backbone_weights: a classification checkpoint file, or ``True`` / a ``variant.tag`` name for the
            published ImageNet weights; ``None``: random.
        preset: backbone settings (:data:`~transnext.dense.DENSE_PRESETS`, ``mask2former``), or ``None``.
        num_queries, feat_channels, decoder_layers, encoder_layers: head size (reference: 100, 256, 9, 6).
        head_kwargs: further :class:`Mask2FormerHead` arguments (``num_heads``, ``num_points``, ``encoder_ffn_dims``,
            ``decoder_ffn_dims``, ``out_channels``, ``num_groups``, ``dropout``).
        loss_kwargs: :class:`Mask2FormerLoss` arguments (``num_points`` 12544, ``oversample_ratio`` ...).
        **backbone_kwargs: :func:`~transnext.dense.create_backbone` / model arguments.
    """
    from .detection import build_trunk

    backbone = build_trunk(variant, backbone_weights, preset, frozen_stages=frozen_stages, **backbone_kwargs)
    if len(backbone.out_channels) != 4:
        raise ValueError(f"Mask2Former needs the four stage maps, got out_indices {backbone.out_indices}")
    head = dict(feat_channels=feat_channels, out_channels=feat_channels, num_queries=num_queries, decoder_layers=decoder_layers,
                encoder_layers=encoder_layers)
    head.update(head_kwargs or {})
    return Mask2Former(backbone, num_classes, ignore_index=ignore_index, loss_kwargs=loss_kwargs, **head)


def convert_mmdet_mask2former(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """An mmseg 1.x Mask2Former state dict (bare or ``{"meta", "state_dict"}``) in the key names of :class:`Mask2Former`.

    ``decode_head.*`` keys keep their names (the head's submodules are named as the reference's);
    the backbone goes through the classification filter into ``backbone.model.*``.
    """
    from ..checkpoints import _unwrap, checkpoint_filter_fn

    state_dict = _unwrap(state_dict, "<mmseg state dict>")
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    out = {"backbone.model." + k: v for k, v in checkpoint_filter_fn(backbone, nn.Module()).items()}
    out.update({k: v for k, v in state_dict.items() if not k.startswith("backbone.")})
    return out


def is_mmseg_mask2former(state_dict: Mapping[str, Any]) -> bool:
    """An mmseg ``EncoderDecoder`` with a Mask2Former head (its pixel decoder and query keys)."""
    keys = list(state_dict)
    return (any(k.startswith("decode_head.pixel_decoder.") for k in keys) and "decode_head.query_feat.weight" in state_dict)


def is_mask2former(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`Mask2Former` (what an mmseg Mask2Former checkpoint loads into)."""
    return isinstance(model, Mask2Former)
