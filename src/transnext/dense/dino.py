"""DINO (DETR with improved denoising anchor boxes) on TransNeXt, in plain PyTorch.

The detector of the reference ``dino-4scale`` / ``dino-5scale`` TransNeXt COCO configs:

* the trunk's stage maps (strides 8-32 for 4 scales, 4-32 for 5) mapped to ``embed_dims`` by 1x1
  convs + GroupNorm(32), plus one 3x3 stride-2 conv + GN level on the last stage map;
* sine positional encoding (normalised, temperature 20) + a learned embedding per level;
* a deformable encoder (6 layers) and a DINO decoder (6 layers, 900 queries) whose layers refine
  the boxes ("look forward twice": each layer's box head reads the previous layer's undetached
  boxes);
* two-stage "mixed" query selection: the encoder's top-k proposals give the reference boxes,
  the content queries are learned;
* contrastive denoising in training (about ``dn_queries`` positive and as many negative noised
  ground-truth queries, label noise 0.5, box noise 1.0);
* Hungarian matching (focal cost 2, L1 5, GIoU 2) and focal (alpha 0.25, gamma 2, weight 1) + L1
  (5) + GIoU (2) losses on every decoder layer, the encoder proposals and the denoising queries;
* top-k post-processing over queries x classes (300 per image).

Interface as torchvision's detectors: ``model(images, targets)`` with ``images`` a list of CHW
float tensors in [0, 1] of any sizes and ``targets`` a list of ``{"boxes": [N, 4] xyxy pixels,
"labels": [N]}``; training returns the loss dict (mmdet's names: ``loss_cls``, ``d0.loss_bbox``,
``enc_loss_iou``, ``dn_loss_cls`` ...), evaluation a list of ``{"boxes", "scores", "labels"}``
per image in its own pixels. Images are resized (shorter side ``min_size``, one drawn per image in
training, longer side <= ``max_size``), normalised with the ImageNet mean / std and padded; the
padding is masked out of attention and of the positional encoding, and boxes are normalised by
each image's own resized size, as in the reference.

Labels: the model has ``num_classes`` real classes and no background logit (sigmoid focal
classification). With ``label_offset=0`` (the default) class ``c`` is label ``c``; the dense engine
counts label 0 as the background of every detector, and builds DINO with ``label_offset=1`` so that
its labels 1..K mean the same as Mask R-CNN's.

Same module names as mmdet's ``DINO``, so :func:`convert_mmdet_dino` maps a reference checkpoint
almost one to one. Known differences from the reference run: the training resize is torchvision's
(floor instead of round of the scaled size); mmdet's random-crop branch of the training pipeline is
not part of the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deformable_attention import MultiScaleDeformableAttention
from .matching import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, hungarian_match, mean_over_processes
from .transformer_layers import FFN, Attention, ConvGN, DeformableEncoderLayer

__all__ = ["DINO", "convert_mmdet_dino", "dino_transnext", "inverse_sigmoid", "is_mmdet_dino"]

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# the reference multi-scale training resize (shorter side; longer side <= 1333) and the test size
TRAIN_MIN_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
_F32_EPS = torch.finfo(torch.float32).eps


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to >= ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_encoding(coords: Tensor, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi) -> Tensor:
    """Sine / cosine features of normalised coordinates ``[..., 2 or 4]`` (x, y[, w, h]) -> ``[..., num_feats * D]``,
    ordered y, x(, w, h) as the DINO decoder's query position."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = (temperature ** (2 * (dim_t // 2) / num_feats)).to(coords.dtype)

    def enc(v: Tensor) -> Tensor:
        pos = (v * scale)[..., None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [enc(coords[..., 1]), enc(coords[..., 0])]
    if coords.shape[-1] == 4:
        parts += [enc(coords[..., 2]), enc(coords[..., 3])]
    elif coords.shape[-1] != 2:
        raise ValueError(f"coordinates must have 2 or 4 values on the last axis, got {coords.shape[-1]}")
    return torch.cat(parts, dim=-1)


def sine_positional_encoding(mask: Tensor, num_feats: int, temperature: float = 20.0, offset: float = 0.0,
                             scale: float = 2 * math.pi, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 2-d sine position map ``[B, 2 * num_feats, H, W]`` of a padding ``mask`` ``[B, H, W]`` (True = padding)."""
    not_mask = (~mask).to(dtype)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = (temperature ** (2 * (dim_t // 2) / num_feats)).to(dtype)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------- building blocks
class ChannelMapper(nn.Module):
    """Every input map to ``out_channels`` (1x1 conv + GN), plus extra 3x3 stride-2 levels from the last input map."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int | None = None, groups: int = 32) -> None:
        super().__init__()
        num_outs = num_outs or len(in_channels)
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be >= the number of input maps ({len(in_channels)})")
        if out_channels % groups:
            raise ValueError(f"the channel mapper's width ({out_channels}) must be divisible by its {groups} GroupNorm groups")
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1, groups=groups) for c in in_channels)
        extra = [ConvGN(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2, groups=groups)
                 for i in range(num_outs - len(in_channels))]
        self.extra_convs = nn.ModuleList(extra) if extra else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        if len(inputs) != len(self.convs):
            raise ValueError(f"the channel mapper expects {len(self.convs)} maps, got {len(inputs)}")
        outs = [conv(x) for conv, x in zip(self.convs, inputs)]
        if self.extra_convs is not None:
            for i, conv in enumerate(self.extra_convs):
                outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return outs


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DeformableEncoder(nn.Module):
    """Stack of deformable encoder layers; each pixel attends from its own centre on every level."""

    def __init__(self, num_layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised by the valid part of each map, seen on every level: ``[B, S, L, 2]``."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device), indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, query: Tensor, query_pos: Tensor, key_padding_mask: Tensor | None, spatial_shapes: list[tuple[int, int]],
                valid_ratios: Tensor) -> Tensor:
        refs = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            query = layer(query, query_pos, refs, spatial_shapes, key_padding_mask)
        return query


class DecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention to the memory, FFN; post-norm."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, ffn_dims: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = Attention(embed_dims, num_heads, dropout)
        self.cross_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, dropout)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query: Tensor, query_pos: Tensor, value: Tensor, key_padding_mask: Tensor | None, self_attn_mask: Tensor | None,
                reference_points: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        query = self.norms[0](self.self_attn(query, query_pos=query_pos, attn_mask=self_attn_mask))
        query = self.cross_attn(query, value, query_pos=query_pos, key_padding_mask=key_padding_mask,
                                reference_points=reference_points, spatial_shapes=spatial_shapes)
        return self.norms[2](self.ffn(self.norms[1](query)))


class DinoDecoder(nn.Module):
    """Decoder layers with box refinement: query positions from the current boxes, boxes updated after each layer."""

    def __init__(self, num_layers: int, embed_dims: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.layers = nn.ModuleList(DecoderLayer(embed_dims, **layer_kwargs) for _ in range(num_layers))
        self.ref_point_head = MLP(embed_dims * 2, embed_dims, embed_dims, 2)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, query: Tensor, value: Tensor, key_padding_mask: Tensor | None, self_attn_mask: Tensor | None,
                reference_points: Tensor, spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor,
                reg_branches: nn.ModuleList) -> tuple[Tensor, Tensor]:
        """``(normed hidden states [layers, B, Q, C], boxes [layers + 1, B, Q, 4])`` (sigmoid cxcywh; the first are the inputs)."""
        states, refs = [], [reference_points]
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for lid, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * ratios
            query_pos = self.ref_point_head(sine_encoding(ref_input[:, :, 0, :], self.embed_dims // 2))
            query = layer(query, query_pos, value, key_padding_mask, self_attn_mask, ref_input, spatial_shapes)
            new_refs = (reg_branches[lid](query) + inverse_sigmoid(reference_points, eps=1e-3)).sigmoid()
            reference_points = new_refs.detach()
            states.append(self.norm(query))
            refs.append(new_refs)  # undetached: the next layer's box loss reaches this layer's box head
        return torch.stack(states), torch.stack(refs)


class CdnQueryGenerator(nn.Module):
    """Contrastive denoising queries: each ground-truth box as a positive (small noise) and a negative (larger noise)
    query, in ``groups = dn_queries // max objects per image`` groups, plus the attention mask that keeps groups and the
    matching queries from seeing each other's answers."""

    def __init__(self, num_classes: int, embed_dims: int, num_matching_queries: int, label_noise_scale: float = 0.5,
                 box_noise_scale: float = 1.0, num_dn_queries: int = 100) -> None:
        super().__init__()
        if label_noise_scale <= 0 or box_noise_scale <= 0:
            raise ValueError(f"the denoising noise scales must be > 0, got label {label_noise_scale}, box {box_noise_scale}")
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_matching_queries = num_matching_queries
        self.label_noise_scale = label_noise_scale
        self.box_noise_scale = box_noise_scale
        self.num_dn_queries = num_dn_queries
        self.label_embedding = nn.Embedding(num_classes, embed_dims)

    def num_groups(self, max_num_target: int) -> int:
        return max(1, self.num_dn_queries // max_num_target) if max_num_target > 0 else 1

    def forward(self, labels: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
        """``labels`` (0-based) and ``boxes`` (xyxy normalised by each image's size) per image ->
        ``(label queries [B, D, C], box queries [B, D, 4] (inverse-sigmoid cxcywh), attention mask [D + Q, D + Q], meta)``."""
        device = self.label_embedding.weight.device
        counts = [len(b) for b in boxes]
        max_num = max(counts)
        groups = self.num_groups(max_num)
        gt_labels = torch.cat(labels).to(device)
        gt_boxes = torch.cat(boxes).to(device, self.label_embedding.weight.dtype)
        # The random draws below are made in the reference's order and shapes, so that one seed gives the same noise.
        labels_rep = gt_labels.repeat(2 * groups, 1).view(-1)
        p = torch.rand_like(labels_rep.float())
        chosen = torch.nonzero(p < self.label_noise_scale * 0.5).view(-1)
        new_labels = torch.randint_like(chosen, 0, self.num_classes)
        label_query = self.label_embedding(labels_rep.scatter(0, chosen, new_labels))
        boxes_rep = gt_boxes.repeat(2 * groups, 1)
        n = len(gt_boxes)
        pos_idx = (torch.arange(n, device=device)[None].repeat(groups, 1)
                   + 2 * n * torch.arange(groups, device=device)[:, None]).flatten()
        sign = torch.randint_like(boxes_rep, low=0, high=2, dtype=torch.float32).to(boxes_rep.dtype) * 2.0 - 1.0
        part = torch.rand_like(boxes_rep)
        part[pos_idx + n] += 1.0  # negatives: noise of 1..2 half-sizes instead of 0..1
        part *= sign
        half_wh = box_xyxy_to_cxcywh(boxes_rep)[:, 2:].repeat(1, 2)
        noisy = (boxes_rep + part * half_wh * self.box_noise_scale / 2).clamp(0.0, 1.0)
        box_query = inverse_sigmoid(box_xyxy_to_cxcywh(noisy), eps=1e-3)
        # into [B, D] slots: block k (2 per group: positives, negatives) of max_num slots each
        batch_idx = torch.cat([torch.full((c,), i, dtype=torch.long, device=device) for i, c in enumerate(counts)])
        slot = torch.cat([torch.arange(c, device=device) for c in counts])
        slot = torch.cat([slot + max_num * k for k in range(2 * groups)])
        bidx = batch_idx.repeat(2 * groups)
        num_dn = max_num * 2 * groups
        label_out = label_query.new_zeros(len(counts), num_dn, self.embed_dims)
        box_out = box_query.new_zeros(len(counts), num_dn, 4)
        label_out[bidx, slot] = label_query
        box_out[bidx, slot] = box_query
        total = num_dn + self.num_matching_queries
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        mask[num_dn:, :num_dn] = True
        for g in range(groups):
            rows = slice(2 * max_num * g, 2 * max_num * (g + 1))
            mask[rows, 2 * max_num * (g + 1):num_dn] = True
            mask[rows, :2 * max_num * g] = True
        return label_out, box_out, mask, {"num_denoising_queries": num_dn, "num_denoising_groups": groups}


class DINOHead(nn.Module):
    """Per-layer class and box branches (``num_layers + 1``: the last one scores the encoder's proposals)."""

    def __init__(self, num_classes: int, embed_dims: int, num_pred_layer: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_branches = nn.ModuleList(nn.Linear(embed_dims, num_classes) for _ in range(num_pred_layer))
        self.reg_branches = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims), nn.ReLU(),
                          nn.Linear(embed_dims, 4)) for _ in range(num_pred_layer))
        prior = -math.log((1 - 0.01) / 0.01)  # initial foreground probability 0.01
        for m in self.cls_branches:
            nn.init.constant_(m.bias, prior)
        for m in self.reg_branches:
            nn.init.zeros_(m[-1].weight)
            nn.init.zeros_(m[-1].bias)

    def forward(self, hidden_states: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [layers, B, Q, K], boxes [layers, B, Q, 4] sigmoid cxcywh)``; layer ``l`` refines ``references[l]``."""
        classes, coords = [], []
        for lid in range(hidden_states.shape[0]):
            h = hidden_states[lid]
            classes.append(self.cls_branches[lid](h))
            coords.append((self.reg_branches[lid](h) + inverse_sigmoid(references[lid])).sigmoid())
        return torch.stack(classes), torch.stack(coords)


# ---------------------------------------------------------------------- losses
def sigmoid_focal_loss(logits: Tensor, labels: Tensor, num_classes: int, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss ``[N, K]`` of logits against labels ``[N]`` (``num_classes`` = background: all zeros)."""
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def focal_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12) -> Tensor:
    """Matching cost ``[Q, N]``: focal loss of predicting each target's class minus that of not predicting it."""
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, labels] - neg[:, labels]


class SetCriterion(nn.Module):
    """Hungarian matching and the classification / L1 / GIoU losses of one set of predictions."""

    def __init__(self, num_classes: int, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 match_cls: float = 2.0, match_l1: float = 5.0, match_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.match_cls, self.match_l1, self.match_giou = match_cls, match_l1, match_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def match(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(query indices, target indices)`` of one image: ``boxes`` sigmoid cxcywh, ``gt_boxes`` xyxy pixels, ``size`` (h, w)."""
        if len(gt_labels) == 0 or len(logits) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            return empty, empty
        h, w = size
        factor = boxes.new_tensor([w, h, w, h])
        gt_norm = gt_boxes / factor
        cost = (self.match_cls * focal_cost(logits, gt_labels, self.alpha, self.gamma)
                + self.match_l1 * torch.cdist(boxes, box_xyxy_to_cxcywh(gt_norm), p=1)
                - self.match_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes) * factor, gt_boxes))
        rows, cols = hungarian_match(cost)
        return rows.to(logits.device), cols.to(logits.device)

    def losses(self, logits: Tensor, boxes: Tensor, labels: Tensor, box_targets: Tensor, box_weights: Tensor,
               sizes: Tensor, num_pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """Losses of flattened predictions ``[N, K]`` / ``[N, 4]`` against per-query targets (background = ``num_classes``).

        The normaliser is the number of matched queries, averaged over the processes of a DDP run as the reference does
        (every process calls this the same number of times per step)."""
        avg = max(mean_over_processes(float(num_pos), logits.device), 1.0)
        if len(logits) == 0:
            zero = logits.sum() * 0.0 + boxes.sum() * 0.0
            return zero, zero, zero
        loss_cls = self.cls_weight * sigmoid_focal_loss(logits, labels, self.num_classes, self.alpha, self.gamma).sum() / (avg + _F32_EPS)
        if not bool((box_weights > 0).any()):
            zero = (boxes * box_weights).sum()
            return loss_cls, zero, zero
        loss_l1 = self.l1_weight * (torch.abs(boxes - box_targets) * box_weights).sum() / (avg + _F32_EPS)
        factor = sizes.flip(-1).repeat(1, 2).to(boxes.dtype)  # (w, h, w, h) per query
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes) * factor, box_cxcywh_to_xyxy(box_targets) * factor, aligned=True)
        loss_giou = self.giou_weight * ((1 - giou) * box_weights.mean(-1)).sum() / (avg + _F32_EPS)
        return loss_cls, loss_l1, loss_giou

    def matched_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]],
                       sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Match each image's queries to its targets, then the three losses (``logits`` ``[B, Q, K]``, ``boxes`` ``[B, Q, 4]``)."""
        batch, queries, _ = logits.shape
        labels = torch.full((batch, queries), self.num_classes, dtype=torch.long, device=logits.device)
        box_targets = boxes.new_zeros(batch, queries, 4)
        box_weights = boxes.new_zeros(batch, queries, 4)
        num_pos = 0
        for b, t in enumerate(targets):
            size = (int(sizes[b, 0]), int(sizes[b, 1]))
            rows, cols = self.match(logits[b].detach(), boxes[b].detach(), t["labels"], t["boxes"], size)
            labels[b, rows] = t["labels"][cols]
            h, w = size
            box_targets[b, rows] = box_xyxy_to_cxcywh(t["boxes"][cols].to(boxes.dtype) / boxes.new_tensor([w, h, w, h]))
            box_weights[b, rows] = 1.0
            num_pos += len(rows)
        per_query = sizes[:, None, :].expand(batch, queries, 2).reshape(-1, 2)
        return self.losses(logits.reshape(-1, logits.shape[-1]), boxes.reshape(-1, 4), labels.reshape(-1), box_targets.reshape(-1, 4),
                           box_weights.reshape(-1, 4), per_query, num_pos)

    def denoising_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], sizes: Tensor,
                         meta: Mapping[str, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Losses of the denoising queries: each positive query against its own ground truth, negatives are background."""
        batch, num_dn = logits.shape[:2]
        groups = meta["num_denoising_groups"]
        per_group = num_dn // groups if groups else 0
        labels = torch.full((batch, num_dn), self.num_classes, dtype=torch.long, device=logits.device)
        box_targets = boxes.new_zeros(batch, num_dn, 4)
        box_weights = boxes.new_zeros(batch, num_dn, 4)
        num_pos = 0
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                continue
            idx = (torch.arange(groups, device=logits.device)[:, None] * per_group + torch.arange(n, device=logits.device)).flatten()
            h, w = int(sizes[b, 0]), int(sizes[b, 1])
            labels[b, idx] = t["labels"].repeat(groups)
            box_targets[b, idx] = box_xyxy_to_cxcywh(t["boxes"].to(boxes.dtype) / boxes.new_tensor([w, h, w, h])).repeat(groups, 1)
            box_weights[b, idx] = 1.0
            num_pos += len(idx)
        per_query = sizes[:, None, :].expand(batch, num_dn, 2).reshape(-1, 2)
        return self.losses(logits.reshape(-1, logits.shape[-1]), boxes.reshape(-1, 4), labels.reshape(-1), box_targets.reshape(-1, 4),
                           box_weights.reshape(-1, 4), per_query, num_pos)


# ---------------------------------------------------------------------- the detector
class DINO(nn.Module):
    """DINO on a multi-scale trunk (see the module docstring). ``backbone`` returns a list of NCHW maps and has
    ``out_channels``; ``num_classes`` counts real classes only."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 80,
        num_feature_levels: int = 4,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dims: int = 2048,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        num_queries: int = 900,
        dn_queries: int = 100,
        label_noise_scale: float = 0.5,
        box_noise_scale: float = 1.0,
        pos_temperature: float = 20.0,
        pos_offset: float = 0.0,
        dropout: float = 0.0,
        max_per_img: int = 300,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        label_offset: int = 0,
        gn_groups: int = 32,
        image_mean: Sequence[float] = IMAGENET_MEAN_STD[0],
        image_std: Sequence[float] = IMAGENET_MEAN_STD[1],
    ) -> None:
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (real classes, no background), got {num_classes}")
        if embed_dims % 2:
            raise ValueError(f"embed_dims must be even (half of it goes to each axis of the positional encoding), got {embed_dims}")
        for name, val in (("num_queries", num_queries), ("num_decoder_layers", num_decoder_layers), ("max_per_img", max_per_img)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if num_encoder_layers < 0 or dn_queries < 0:
            raise ValueError(f"num_encoder_layers and dn_queries must be >= 0, got {num_encoder_layers} and {dn_queries}")
        in_channels = list(backbone.out_channels)
        if num_feature_levels < len(in_channels):
            raise ValueError(f"num_feature_levels ({num_feature_levels}) is below the trunk's {len(in_channels)} output maps")
        self.backbone = backbone
        self.neck = ChannelMapper(in_channels, embed_dims, num_feature_levels, gn_groups)
        self.num_classes = num_classes
        self.num_feature_levels = num_feature_levels
        self.embed_dims = embed_dims
        self.num_queries = num_queries
        self.dn_queries = dn_queries
        self.max_per_img = max_per_img
        self.label_offset = int(label_offset)
        self.pos_temperature, self.pos_offset = float(pos_temperature), float(pos_offset)
        layer = dict(embed_dims=embed_dims, num_heads=num_heads, num_levels=num_feature_levels, num_points=num_points,
                     ffn_dims=ffn_dims, dropout=dropout)
        self.encoder = DeformableEncoder(num_encoder_layers, **layer)
        self.decoder = DinoDecoder(num_decoder_layers, **layer)
        self.query_embedding = nn.Embedding(num_queries, embed_dims)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, embed_dims))
        self.memory_trans_fc = nn.Linear(embed_dims, embed_dims)
        self.memory_trans_norm = nn.LayerNorm(embed_dims)
        self.dn_query_generator = CdnQueryGenerator(num_classes, embed_dims, num_queries, label_noise_scale, box_noise_scale, dn_queries)
        self.bbox_head = DINOHead(num_classes, embed_dims, num_decoder_layers + 1)
        self.criterion = SetCriterion(num_classes)
        sizes = (min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
        self.transform = GeneralizedRCNNTransform(sizes, max_size, list(image_mean), list(image_std), size_divisible=1)
        self._reset_transformer()

    def _reset_transformer(self) -> None:
        for coder in (self.encoder, self.decoder):
            for p in coder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.memory_trans_fc.weight)
        nn.init.xavier_uniform_(self.query_embedding.weight)
        nn.init.normal_(self.level_embed)

    # -- inputs
    def _check_inputs(self, images: Any, targets: Any) -> None:
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("DINO takes a non-empty list of CHW image tensors")
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 or not im.is_floating_point():
                what = f"shape {tuple(im.shape)} {im.dtype}" if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"image {i}: expected a float tensor [3, H, W] with values in [0, 1], got {what}")
            if im.shape[1] < 1 or im.shape[2] < 1:
                raise ValueError(f"image {i} is empty: shape {tuple(im.shape)}")
        if self.training:
            if targets is None:
                raise ValueError("DINO in training mode needs targets (a list of dicts with 'boxes' and 'labels'); "
                                 "call model.eval() to predict")
            if len(targets) != len(images):
                raise ValueError(f"{len(images)} images but {len(targets)} targets")
            for i, t in enumerate(targets):
                boxes, labels = t.get("boxes"), t.get("labels")
                if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(f"target {i}: 'boxes' must be a float tensor [N, 4] (x1, y1, x2, y2 pixels), got "
                                     f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
                if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1] or labels.is_floating_point():
                    raise ValueError(f"target {i}: 'labels' must be an integer tensor [N] matching the {len(boxes)} boxes")
                if len(boxes):
                    if not torch.isfinite(boxes).all() or bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                        raise ValueError(f"target {i}: every box needs finite coordinates with x2 > x1 and y2 > y1")
                    lo, hi = self.label_offset, self.label_offset + self.num_classes - 1
                    if int(labels.min()) < lo or int(labels.max()) > hi:
                        raise ValueError(f"target {i}: labels must lie in {lo}..{hi} ({self.num_classes} classes, label_offset "
                                         f"{self.label_offset}), got {int(labels.min())}..{int(labels.max())}")

    def _prepare(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None):
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        if targets is not None:
            targets = [{"boxes": t["boxes"].to(torch.float32), "labels": t["labels"]} for t in targets]
        image_list, targets = self.transform(list(images), targets)
        batch = image_list.tensors
        sizes = torch.tensor(image_list.image_sizes, dtype=torch.long, device=batch.device)
        mask = torch.ones(batch.shape[0], batch.shape[-2], batch.shape[-1], dtype=torch.bool, device=batch.device)
        for b, (h, w) in enumerate(image_list.image_sizes):
            mask[b, :h, :w] = False
        return batch, mask, sizes, image_list.image_sizes, original_sizes, targets

    # -- transformer
    def _flatten_levels(self, feats: list[Tensor], mask: Tensor):
        flat, pos_flat, mask_flat, shapes, ratios = [], [], [], [], []
        for lvl, feat in enumerate(feats):
            b, c, h, w = feat.shape
            m = F.interpolate(mask[None].to(feat.dtype), size=(h, w)).to(torch.bool)[0]
            pos = sine_positional_encoding(m, c // 2, self.pos_temperature, self.pos_offset, dtype=feat.dtype)
            flat.append(feat.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
            mask_flat.append(m.flatten(1))
            shapes.append((h, w))
            valid_h = (~m[:, :, 0]).sum(1).to(feat.dtype) / h
            valid_w = (~m[:, 0, :]).sum(1).to(feat.dtype) / w
            ratios.append(torch.stack([valid_w, valid_h], -1))
        return torch.cat(flat, 1), torch.cat(pos_flat, 1), torch.cat(mask_flat, 1), shapes, torch.stack(ratios, 1)

    def encoder_proposals(self, memory: Tensor, memory_mask: Tensor, spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """``(transformed memory [B, S, C], proposals [B, S, 4] inverse-sigmoid cxcywh, +inf where invalid)``: one box per
        pixel, centred on it, of side 0.05 * 2**level of the valid image."""
        batch = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes):
            m = memory_mask[:, start:start + h * w].view(batch, h, w)
            valid_h = (~m[:, :, 0]).sum(1)
            valid_w = (~m[:, 0, :]).sum(1)
            scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2).to(memory.dtype)
            ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=memory.dtype, device=memory.device),
                                    torch.linspace(0, w - 1, w, dtype=memory.dtype, device=memory.device), indexing="ij")
            grid = (torch.stack([xs, ys], -1)[None].expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += h * w
        props = torch.cat(proposals, 1)
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        props = props.masked_fill(memory_mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
        out = memory.masked_fill(memory_mask[..., None], 0.0).masked_fill(~valid, 0.0)
        return self.memory_trans_norm(self.memory_trans_fc(out)), props

    def forward_transformer(self, feats: list[Tensor], mask: Tensor, dn: tuple[Tensor, Tensor, Tensor, dict[str, int]] | None = None
                            ) -> dict[str, Any]:
        """Encoder, query selection and decoder on the neck's maps; ``dn``: denoising queries (training)."""
        if len(feats) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(feats)}")
        feat, pos, key_mask, shapes, ratios = self._flatten_levels(feats, mask)
        memory = self.encoder(feat, pos, key_mask, shapes, ratios)
        out_memory, proposals = self.encoder_proposals(memory, key_mask, shapes)
        num_layers = len(self.decoder.layers)
        enc_class = self.bbox_head.cls_branches[num_layers](out_memory)
        enc_coord_unact = self.bbox_head.reg_branches[num_layers](out_memory) + proposals
        k = min(self.num_queries, enc_class.shape[1])
        topk = torch.topk(enc_class.max(-1)[0], k=k, dim=1)[1]
        topk_score = torch.gather(enc_class, 1, topk[..., None].expand(-1, -1, enc_class.shape[-1]))
        topk_unact = torch.gather(enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4))
        topk_coords = topk_unact.sigmoid()
        topk_unact = topk_unact.detach()
        batch = memory.shape[0]
        query = self.query_embedding.weight[:k][None].expand(batch, -1, -1)
        attn_mask, meta = None, None
        if dn is not None:
            dn_label, dn_box, attn_mask, meta = dn
            if k < self.num_queries:  # fewer pixels than queries: the mask shrinks with the matching part
                attn_mask = attn_mask[: meta["num_denoising_queries"] + k, : meta["num_denoising_queries"] + k]
            query = torch.cat([dn_label, query], 1)
            refs = torch.cat([dn_box, topk_unact], 1).sigmoid()
        else:
            refs = topk_unact.sigmoid()
        states, references = self.decoder(query, memory, key_mask, attn_mask, refs, shapes, ratios, self.bbox_head.reg_branches)
        if dn is not None and meta["num_denoising_queries"] == 0:
            # keep the label embedding in the graph (DDP) when no image of the batch has an object
            states = states + self.dn_query_generator.label_embedding.weight[0, 0] * 0.0
        return dict(hidden_states=states, references=references, enc_outputs_class=topk_score, enc_outputs_coord=topk_coords,
                    dn_meta=meta)

    # -- outputs
    def compute_losses(self, out: dict[str, Any], targets: list[dict[str, Tensor]], sizes: Tensor) -> dict[str, Tensor]:
        """The loss dict of the transformer outputs against targets (labels 0-based, boxes xyxy in resized pixels)."""
        all_cls, all_box = self.bbox_head(out["hidden_states"], out["references"])
        meta = out["dn_meta"]
        num_dn = meta["num_denoising_queries"] if meta is not None else 0
        losses: dict[str, Tensor] = {}
        num_layers = all_cls.shape[0]
        for lid in range(num_layers):
            cls, l1, giou = self.criterion.matched_losses(all_cls[lid, :, num_dn:], all_box[lid, :, num_dn:], targets, sizes)
            prefix = "" if lid == num_layers - 1 else f"d{lid}."
            losses[f"{prefix}loss_cls"], losses[f"{prefix}loss_bbox"], losses[f"{prefix}loss_iou"] = cls, l1, giou
        cls, l1, giou = self.criterion.matched_losses(out["enc_outputs_class"], out["enc_outputs_coord"], targets, sizes)
        losses["enc_loss_cls"], losses["enc_loss_bbox"], losses["enc_loss_iou"] = cls, l1, giou
        if meta is not None:
            for lid in range(num_layers):
                cls, l1, giou = self.criterion.denoising_losses(all_cls[lid, :, :num_dn], all_box[lid, :, :num_dn], targets, sizes, meta)
                prefix = "" if lid == num_layers - 1 else f"d{lid}."
                losses[f"{prefix}dn_loss_cls"], losses[f"{prefix}dn_loss_bbox"], losses[f"{prefix}dn_loss_iou"] = cls, l1, giou
        return losses

    def postprocess(self, logits: Tensor, boxes: Tensor, sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Top ``max_per_img`` (query, class) pairs of the last layer per image, boxes in resized pixels clamped to the image."""
        results = []
        for b, (h, w) in enumerate(sizes):
            scores = logits[b].sigmoid().flatten()
            k = min(self.max_per_img, scores.numel())
            scores, idx = scores.topk(k)
            labels = idx % self.num_classes
            det = box_cxcywh_to_xyxy(boxes[b][idx // self.num_classes])
            det = det * det.new_tensor([w, h, w, h])
            det = torch.stack([det[:, 0].clamp(0, w), det[:, 1].clamp(0, h), det[:, 2].clamp(0, w), det[:, 3].clamp(0, h)], -1)
            results.append({"boxes": det, "scores": scores, "labels": labels + self.label_offset})
        return results

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        self._check_inputs(images, targets)
        batch, mask, sizes, image_sizes, original_sizes, targets = self._prepare(images, targets if self.training else None)
        feats = self.neck(self.backbone(batch))
        if not self.training:
            out = self.forward_transformer(feats, mask)
            all_cls, all_box = self.bbox_head(out["hidden_states"], out["references"])
            results = self.postprocess(all_cls[-1], all_box[-1], image_sizes)
            return self.transform.postprocess(results, image_sizes, original_sizes)
        assert targets is not None
        targets = [{"boxes": t["boxes"], "labels": (t["labels"] - self.label_offset).long()} for t in targets]
        norm_boxes = []
        for t, (h, w) in zip(targets, image_sizes):
            norm_boxes.append(t["boxes"] / t["boxes"].new_tensor([w, h, w, h]))
        dn = self.dn_query_generator([t["labels"] for t in targets], norm_boxes)
        out = self.forward_transformer(feats, mask, dn)
        return self.compute_losses(out, targets, sizes)


# ---------------------------------------------------------------------- builder and reference checkpoints
def dino_transnext(
    variant: str = "transnext_tiny",
    num_classes: int = 80,
    num_feature_levels: int = 4,
    backbone_weights: str | os.PathLike | bool | None = None,
    preset: str | None = None,
    frozen_stages: int = -1,
    grad_checkpointing: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    min_size: int | Sequence[int] = TRAIN_MIN_SIZES,
    max_size: int = 1333,
    **kwargs: Any,
) -> DINO:
    """DINO on TransNeXt, as the reference ``dino-{4,5}scale_transnext_*-12e_coco`` configs.

    Args:
        variant: TransNeXt variant.
        num_classes: real classes (COCO: 80); no background logit.
        num_feature_levels: 4 (trunk strides 8-32 + one extra level) or 5 (strides 4-32 + one extra).
        backbone_weights: see :func:`transnext.dense.detection.build_trunk`.
        preset: backbone settings; default ``dino_4scale`` for 4 levels, ``dino`` for 5.
        backbone_kwargs: model arguments for the trunk (``drop_path_rate``, ``img_size``, dims ...).
        min_size: shorter side after resizing; several values: one drawn per image in training
            (default: the reference's 480-800 in steps of 32; evaluation uses the largest value).
        max_size: longest side after resizing.
        **kwargs: :class:`DINO` arguments (``embed_dims``, ``num_queries``, ``dn_queries``,
            ``num_encoder_layers``, ``num_decoder_layers``, ``max_per_img``, ``label_offset`` ...).
    """
    from .detection import build_trunk

    if num_feature_levels not in (4, 5) and preset is None:
        raise ValueError(f"num_feature_levels must be 4 or 5 (or give preset= with the trunk's outputs), got {num_feature_levels}")
    preset = preset or ("dino_4scale" if num_feature_levels == 4 else "dino")
    trunk = build_trunk(variant, backbone_weights, preset, frozen_stages=frozen_stages, grad_checkpointing=grad_checkpointing,
                        **(backbone_kwargs or {}))
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    return DINO(trunk, num_classes=num_classes, num_feature_levels=num_feature_levels, min_size=sizes, max_size=max_size, **kwargs)


def is_mmdet_dino(state_dict: Mapping[str, Any]) -> bool:
    """An mmdet ``DINO`` state dict: backbone, encoder, decoder and the denoising generator's label embedding."""
    keys = list(state_dict)
    return (any(k.startswith("backbone.") for k in keys) and any(k.startswith("encoder.layers.") for k in keys)
            and "dn_query_generator.label_embedding.weight" in state_dict and any(k.startswith("bbox_head.cls_branches.") for k in keys))


def convert_mmdet_dino(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Rename an mmdet ``DINO`` state dict (a checkpoint's ``state_dict``) to :class:`DINO` on a TransNeXt trunk.

    The transformer, neck and head keys are ours already; the backbone keys go through the
    classification checkpoint filter under ``backbone.model.``. Class order is kept (label ``c`` is
    mmdet's class ``c``, shifted by the model's ``label_offset`` at its interface only).
    """
    from ..checkpoints import checkpoint_filter_fn

    sd = state_dict.get("state_dict", state_dict) if isinstance(state_dict, Mapping) else state_dict
    if not is_mmdet_dino(sd):
        raise ValueError("not an mmdet DINO state dict (expected backbone., encoder.layers., bbox_head.cls_branches. and "
                         "dn_query_generator.label_embedding.weight keys)")
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    out = {"backbone.model." + k: v for k, v in checkpoint_filter_fn(backbone, nn.Module()).items()}
    for k, v in sd.items():
        if not k.startswith("backbone."):
            out[k] = v
    return out
