"""DINO against mmdet 3.3's DINO, module by module, in float64 on the same seeded random weights.

The data (tests/data/reference_dino, see its README.md) is a tiny mmdet ``DINO`` (32-wide, 2 encoder
and 2 decoder layers, 12 queries, 4 levels, 5 classes) with float16-rounded random weights and the
reference's outputs: mmcv's deformable attention (its own pure-PyTorch path), the channel mapper,
positional encoding, encoder, proposals, the eval and training transformer, head outputs,
post-processing, the denoising queries of a seeded generator, the matching and the losses.
The reference computes its positional encodings and reference grids in float32, so a few modules
agree to ~1e-6 and not to 1e-12; the tolerances below are the observed errors with a margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("scipy")
from safetensors.torch import load_file  # noqa: E402

from transnext.dense.deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention  # noqa: E402
from transnext.dense.dino import DINO  # noqa: E402

DATA = Path(__file__).parent / "data" / "reference_dino"
META = json.loads((DATA / "meta.json").read_text())
CFG = META["config"]


class _Trunk(nn.Module):
    """Stands in for the backbone: the tests feed the channel mapper the stored maps."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - not called
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "mmdet_dino_io.safetensors"))


@pytest.fixture(scope="module")
def model() -> DINO:
    m = DINO(_Trunk(CFG["in_channels"]), num_classes=CFG["num_classes"], num_feature_levels=CFG["num_feature_levels"],
             embed_dims=CFG["embed_dims"], num_heads=CFG["num_heads"], num_points=CFG["num_points"], ffn_dims=CFG["ffn_dims"],
             num_encoder_layers=CFG["num_encoder_layers"], num_decoder_layers=CFG["num_decoder_layers"],
             num_queries=CFG["num_queries"], dn_queries=CFG["dn_queries"], max_per_img=CFG["max_per_img"],
             pos_offset=CFG["pos_offset"], pos_temperature=CFG["pos_temperature"]).double()
    sd = {k: v.double() for k, v in load_file(str(DATA / "mmdet_dino_tiny.safetensors")).items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == [], (missing, unexpected)  # every key of the reference (but its backbone) is ours
    return m


def _mask() -> torch.Tensor:
    pad_h, pad_w = META["pad_shape"]
    mask = torch.ones(2, pad_h, pad_w, dtype=torch.bool)
    for b, (h, w) in enumerate(META["img_shapes"]):
        mask[b, :h, :w] = False
    return mask


def _neck(ref) -> list[torch.Tensor]:
    return [ref[f"neck_out{i}"] for i in range(CFG["num_feature_levels"])]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.double()).abs().max())


def test_deformable_attention_core_matches_mmcv(ref):
    got = multi_scale_deformable_attention(ref["msda_value"], ref["msda_shapes"], ref["msda_loc"], ref["msda_w"])
    assert _err(got, ref["msda_out"]) < 1e-13


def test_deformable_attention_module_matches_mmcv(ref, model):
    attn = model.encoder.layers[0].self_attn
    assert isinstance(attn, MultiScaleDeformableAttention)
    shapes = ref["msda_shapes"]
    for key, points in (("attn_out2", ref["attn_ref2"]), ("attn_out4", ref["attn_ref4"])):
        got = attn(ref["attn_q"], ref["attn_v"], query_pos=ref["attn_qpos"], key_padding_mask=ref["attn_kpm"],
                   reference_points=points, spatial_shapes=shapes)
        assert _err(got, ref[key]) < 1e-12, key


def test_channel_mapper_matches(ref, model):
    feats = model.neck([ref[f"feat_in{i}"] for i in range(len(CFG["in_channels"]))])
    for i, f in enumerate(feats):
        assert _err(f, ref[f"neck_out{i}"]) < 1e-12


def test_positional_encoding_valid_ratios_and_encoder_match(ref, model):
    _, pos, key_mask, shapes, ratios = model._flatten_levels(_neck(ref), _mask())
    assert _err(pos, ref["enc_feat_pos"]) < 1e-5  # the reference's encoding is float32
    assert _err(ratios, ref["valid_ratios"]) < 1e-7  # float32 in the reference
    feat, pos, key_mask, shapes, ratios = model._flatten_levels(_neck(ref), _mask())
    memory = model.encoder(feat, pos, key_mask, shapes, ratios)
    assert _err(memory, ref["memory"]) < 5e-6
    out_mem, props = model.encoder_proposals(ref["memory"], key_mask, shapes)
    assert _err(out_mem, ref["proposal_memory"]) < 1e-12
    assert _err(props.masked_fill(torch.isinf(props), 1e4), ref["proposals"]) < 1e-6


def test_eval_transformer_head_and_postprocess_match(ref, model):
    with torch.no_grad():
        out = model.forward_transformer(_neck(ref), _mask())
        assert _err(out["hidden_states"], ref["eval_hidden"]) < 5e-6
        assert _err(out["references"], ref["eval_refs"]) < 5e-6
        cls, box = model.bbox_head(ref["eval_hidden"], ref["eval_refs"])
        assert _err(cls, ref["eval_cls"]) < 1e-12 and _err(box, ref["eval_box"]) < 1e-12
        results = model.postprocess(ref["eval_cls"][-1], ref["eval_box"][-1], META["img_shapes"])
    for i, r in enumerate(results):
        assert torch.equal(r["labels"], ref[f"pred_labels{i}"])
        assert _err(r["scores"], ref[f"pred_scores{i}"]) < 1e-12
        assert _err(r["boxes"] / META["scale_factor"], ref[f"pred_boxes{i}"]) < 1e-10


def _targets(ref) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": ref[f"gt_boxes{i}"], "labels": ref[f"gt_labels{i}"]} for i in range(2)]


def test_denoising_queries_match_with_the_same_seed(ref, model):
    targets = _targets(ref)
    boxes = [t["boxes"] / t["boxes"].new_tensor([w, h, w, h]) for t, (h, w) in zip(targets, META["img_shapes"])]
    torch.manual_seed(123)
    label_q, box_q, mask, meta = model.dn_query_generator([t["labels"] for t in targets], boxes)
    assert meta == META["dn_meta"]
    assert torch.equal(mask, ref["dn_mask"])
    assert _err(label_q, ref["dn_label_query"]) == 0
    assert _err(box_q, ref["dn_bbox_query"]) < 1e-12


def test_training_transformer_matching_and_losses_match(ref, model):
    dn = (ref["dn_label_query"], ref["dn_bbox_query"], ref["dn_mask"], dict(META["dn_meta"]))
    out = model.forward_transformer(_neck(ref), _mask(), dn)
    assert _err(out["hidden_states"], ref["train_hidden"]) < 5e-6
    assert _err(out["references"], ref["train_refs"]) < 5e-6
    assert _err(out["enc_outputs_class"], ref["train_enc_cls"]) < 5e-6
    assert _err(out["enc_outputs_coord"], ref["train_enc_coord"]) < 1e-5
    sizes = torch.tensor(META["img_shapes"])
    targets = _targets(ref)
    # matching of the last layer on the reference's own outputs
    cls, box = model.bbox_head(ref["train_hidden"], ref["train_refs"])
    nd = META["dn_meta"]["num_denoising_queries"]
    for b, t in enumerate(targets):
        rows, cols = model.criterion.match(cls[-1, b, nd:], box[-1, b, nd:], t["labels"], t["boxes"], tuple(META["img_shapes"][b]))
        assigned = torch.zeros(cls.shape[2] - nd, dtype=torch.long)
        assigned[rows] = cols + 1
        assert assigned.tolist() == META["assigned_gt_inds"][b]
    # losses on the reference's transformer outputs (the loss code alone) and on ours (end to end)
    ref_out = dict(out, hidden_states=ref["train_hidden"], references=ref["train_refs"], enc_outputs_class=ref["train_enc_cls"],
                   enc_outputs_coord=ref["train_enc_coord"])
    losses = model.compute_losses(ref_out, targets, sizes)
    assert set(losses) == set(META["losses"])
    for k, v in META["losses"].items():
        assert abs(float(losses[k]) - v) < 1e-9, k
    for k, v in model.compute_losses(out, targets, sizes).items():
        assert abs(float(v) - META["losses"][k]) < 1e-4 * max(1.0, abs(META["losses"][k])), k
