"""DINO on TransNeXt: deformable attention against its formula, the model's forward, losses and errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from transnext.dense.deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention


def _bilinear_by_hand(value_l: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of a [H, W, D] map at normalised (x, y), zeros outside (pixel centres at (i + 0.5) / size)."""
    height, width, dim = value_l.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(dim, dtype=value_l.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * value_l[yy, xx]
    return out


def _msda_by_hand(value, shapes, locations, weights) -> torch.Tensor:
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl, (hh, ww) in enumerate(shapes):
                    value_l = value[b, starts[lvl] : starts[lvl + 1], h].reshape(hh, ww, dim)
                    for p in range(points):
                        x, y = locations[b, q, h, lvl, p].tolist()
                        out[b, q, h] += weights[b, q, h, lvl, p] * _bilinear_by_hand(value_l, x, y)
    return out.reshape(batch, queries, heads * dim)


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4)], [(1, 1), (2, 9), (6, 3)]])
def test_deformable_attention_matches_per_point_formula_float64(shapes):
    torch.manual_seed(0)
    batch, heads, dim, queries, points = 2, 2, 3, 4, 3
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, dim, dtype=torch.float64)
    # Some locations fall outside [0, 1] on purpose: they must read zeros.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=torch.float64)
    got = multi_scale_deformable_attention(value, shapes, locations, weights)
    want = _msda_by_hand(value, shapes, locations, weights)
    assert got.shape == (batch, queries, heads * dim)
    assert torch.allclose(got, want, atol=1e-12, rtol=0), (got - want).abs().max()
    # The tensor form of the shapes gives the same result.
    got_t = multi_scale_deformable_attention(value, torch.tensor(shapes), locations, weights)
    assert torch.equal(got, got_t)


def test_deformable_attention_gradients_float64():
    torch.manual_seed(1)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    # Keep the points away from pixel-centre lines, where bilinear sampling is not differentiable.
    locations = (torch.rand(1, 3, 2, 2, 2, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weights = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, s, w: multi_scale_deformable_attention(v, shapes, s, w), (value, locations, weights))


def test_deformable_attention_bad_inputs_are_named():
    value = torch.randn(1, 10, 2, 4)
    loc = torch.rand(1, 3, 2, 1, 2, 2)
    w = torch.rand(1, 3, 2, 1, 2)
    with pytest.raises(ValueError, match="value has 10 keys but spatial_shapes"):
        multi_scale_deformable_attention(value, [(3, 4)], loc, w)
    with pytest.raises(ValueError, match="attention_weights must have shape"):
        multi_scale_deformable_attention(value, [(2, 5)], loc, w[..., :1])
    with pytest.raises(ValueError, match="integer tensor of shape"):
        multi_scale_deformable_attention(value, torch.tensor([[2.0, 5.0]]), loc, w)
    with pytest.raises(ValueError, match="positive ints"):
        multi_scale_deformable_attention(value, [(0, 5)], loc, w)


def test_deformable_attention_module_init_residual_and_reference_boxes():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=3, dropout=0.0).double()
    # Initial offsets: head k points at angle 2*pi*k/heads, scaled to the unit square, at 1..P steps.
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    assert torch.allclose(bias[1, 0, 2], torch.tensor([0.0, 3.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(bias[0, 1, 1], torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert attn.attention_weights.weight.abs().sum() == 0
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(2, 30, 16, dtype=torch.float64)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    ref2 = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    out = attn(query, value, reference_points=ref2, spatial_shapes=shapes)
    # Residual inside: with a zero output projection the query comes back.
    with torch.no_grad():
        attn.output_proj.weight.zero_()
        attn.output_proj.bias.zero_()
    assert torch.equal(attn(query, value, reference_points=ref2, spatial_shapes=shapes), query)
    assert out.shape == query.shape
    ref4 = torch.cat([ref2, torch.full_like(ref2, 0.3)], -1)
    assert attn(query, value, reference_points=ref4, spatial_shapes=shapes).shape == query.shape
    with pytest.raises(ValueError, match="last dimension must be 2"):
        attn(query, value, reference_points=ref4[..., :3], spatial_shapes=shapes)
    with pytest.raises(ValueError, match="built for 2"):
        attn(query, value, reference_points=ref2, spatial_shapes=shapes[:1])


# ---------------------------------------------------------------------- the detector
pytest.importorskip("torchvision")
pytest.importorskip("scipy")

TRUNK = dict(embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], img_size=64,
             pretrain_size=64, drop_path_rate=0.0)
TRUNK_ARCH = {k: TRUNK[k] for k in ("embed_dims", "num_heads", "depths", "mlp_ratios")}
TINY = dict(embed_dims=32, num_heads=4, num_points=2, ffn_dims=64, num_encoder_layers=1, num_decoder_layers=2, num_queries=16,
            dn_queries=8, max_per_img=10, gn_groups=8, min_size=(48, 64), max_size=80)


def _tiny_dino(levels: int = 4, **kw):
    from transnext.dense import dino_transnext

    torch.manual_seed(0)
    return dino_transnext("transnext_micro", num_classes=3, num_feature_levels=levels, backbone_kwargs=dict(TRUNK), **{**TINY, **kw})


def _batch():
    images = [torch.rand(3, 50, 67), torch.rand(3, 33, 41), torch.rand(3, 61, 61)]
    targets = [dict(boxes=torch.tensor([[4.0, 5.0, 30.0, 40.0], [20.0, 2.0, 60.0, 25.0]]), labels=torch.tensor([0, 2])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)),  # an image with no object
               dict(boxes=torch.tensor([[1.0, 1.0, 10.0, 12.0]]), labels=torch.tensor([1]))]
    return images, targets


MATCHING_LOSSES = {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou", "enc_loss_cls", "enc_loss_bbox",
                   "enc_loss_iou"}
DN_LOSSES = {"dn_loss_cls", "dn_loss_bbox", "dn_loss_iou", "d0.dn_loss_cls", "d0.dn_loss_bbox", "d0.dn_loss_iou"}


@pytest.mark.parametrize("levels", [4, 5])
def test_dino_training_step_finite_losses_and_gradients_any_sizes(levels):
    model = _tiny_dino(levels).train()
    assert len(model.neck.convs) == levels - 1 and len(model.neck.extra_convs) == 1
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == MATCHING_LOSSES | DN_LOSSES
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert float(losses["loss_bbox"]) > 0 and float(losses["dn_loss_bbox"]) > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dino_batch_without_any_object_trains_without_nan():
    model = _tiny_dino().train()
    images, targets = _batch()
    empty = [targets[1], targets[1]]
    losses = model(images[:2], empty)
    assert all(torch.isfinite(v) for v in losses.values())
    # nothing to match or denoise: only the background classification terms are non-zero
    assert float(losses["loss_bbox"]) == 0 and float(losses["dn_loss_cls"]) == 0 and float(losses["loss_cls"]) > 0
    sum(losses.values()).backward()
    assert model.dn_query_generator.label_embedding.weight.grad is not None  # still in the graph (DDP)


def test_dino_eval_output_format_and_boxes_inside_each_image():
    model = _tiny_dino().eval()
    images, _ = _batch()
    images.append(torch.rand(3, 9, 140))  # far from square: fewer pixels at the coarse levels than queries
    with torch.no_grad():
        out = model(images)
    assert len(out) == len(images)
    for im, o in zip(images, out):
        assert set(o) == {"boxes", "scores", "labels"}
        assert o["boxes"].shape == (10, 4) and o["scores"].shape == (10,) and o["labels"].dtype == torch.int64
        h, w = im.shape[-2:]
        assert float(o["boxes"][:, 2].max()) <= w + 1e-4 and float(o["boxes"][:, 3].max()) <= h + 1e-4
        assert float(o["boxes"].min()) >= 0 and torch.all(o["scores"][:-1] >= o["scores"][1:])
        assert int(o["labels"].min()) >= 0 and int(o["labels"].max()) <= 2


def test_dino_label_offset_shifts_the_interface_labels():
    model = _tiny_dino(label_offset=1)
    images, targets = _batch()
    with pytest.raises(ValueError, match=r"labels must lie in 1\.\.3"):
        model.train()(images, targets)  # label 0 is the engine's background
    shifted = [dict(t, labels=t["labels"] + 1) for t in targets]
    assert torch.isfinite(sum(model(images, shifted).values()))
    with torch.no_grad():
        labels = model.eval()(images[:1])[0]["labels"]
    assert int(labels.min()) >= 1 and int(labels.max()) <= 3


def test_dino_state_dict_round_trip_gives_the_same_detections():
    model = _tiny_dino().eval()
    other = _tiny_dino()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other.load_state_dict(model.state_dict())
    other.eval()
    images, _ = _batch()
    with torch.no_grad():
        a, b = model(images), other(images)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])


def test_dino_bad_inputs_are_named():
    model = _tiny_dino().train()
    images, targets = _batch()
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    with pytest.raises(ValueError, match="3 images but 2 targets"):
        model(images, targets[:2])
    with pytest.raises(ValueError, match=r"image 1: expected a float tensor \[3, H, W\]"):
        model([images[0], torch.rand(1, 20, 20), images[2]], targets)
    bad = [dict(targets[0], boxes=torch.tensor([[5.0, 5.0, 4.0, 9.0], [0.0, 0.0, 3.0, 3.0]])), *targets[1:]]
    with pytest.raises(ValueError, match="target 0: every box needs finite coordinates with x2 > x1"):
        model(images, bad)
    with pytest.raises(ValueError, match=r"target 2: labels must lie in 0\.\.2"):
        model(images, [*targets[:2], dict(targets[2], labels=torch.tensor([3]))])
    with pytest.raises(ValueError, match="'boxes' must be a float tensor"):
        model(images, [*targets[:2], dict(targets[2], boxes=torch.zeros(1, 5))])
    with pytest.raises(ValueError, match="non-empty list"):
        model([], [])
    from transnext.dense import dino_transnext

    with pytest.raises(ValueError, match="num_feature_levels must be 4 or 5"):
        dino_transnext("transnext_micro", num_feature_levels=3, backbone_kwargs=dict(TRUNK))


def test_hungarian_match_and_giou():
    from transnext.dense.matching import generalized_box_iou, hungarian_match

    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [0.5, 9.0, 9.0]])
    rows, cols = hungarian_match(cost)
    assert rows.tolist() == [1, 2, 3] and cols.tolist() == [1, 2, 0]  # total 2.5, the minimum
    assert hungarian_match(torch.zeros(5, 0))[0].numel() == 0
    with pytest.raises(ValueError, match="NaN or infinite"):
        hungarian_match(torch.tensor([[float("nan")]]))
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    # IoU 1/7, enclosing 9: 1/7 - (9 - 7) / 9; identical boxes 1; disjoint: 0 - (10 - 5) / 10
    want = torch.tensor([[1 / 7 - 2 / 9, 1.0, -0.5]])
    assert torch.allclose(generalized_box_iou(a, b), want, atol=1e-6)
    assert torch.allclose(generalized_box_iou(a.expand(3, 4), b, aligned=True), want[0], atol=1e-6)


# ---------------------------------------------------------------------- engine integration
def test_detection_config_accepts_dino_and_checks_its_fields():
    from transnext.dense.config import DetectionConfig, resolve_dense_config

    cfg = resolve_dense_config(DetectionConfig, "detect_demo_dino", None, {"output": "x"}, require_data=False)
    assert cfg.detector == "dino" and cfg.num_feature_levels == 4 and cfg.num_queries == 60
    with pytest.raises(ValueError, match="num_feature_levels must be 4 or 5 for DINO, got 3"):
        resolve_dense_config(DetectionConfig, "detect_demo_dino", None, {"num_feature_levels": 3}, require_data=False)
    with pytest.raises(ValueError, match="mask_rcnn, retinanet, fcos or dino"):
        resolve_dense_config(DetectionConfig, None, None, {"detector": "detr"}, require_data=False)


def test_build_dense_model_makes_dino_with_the_engine_labels():
    from transnext.dense.config import DetectionConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch

    cfg = resolve_dense_config(DetectionConfig, "detect_demo_dino", None, dict(
        model_kwargs=TRUNK_ARCH, img_size=64, pretrain_size=64,
        num_queries=7, dn_queries=4, detections_per_img=5,
        detector_kwargs=dict(embed_dims=32, num_heads=4, num_points=2, ffn_dims=64, num_encoder_layers=1, num_decoder_layers=1)),
        require_data=False)
    arch = dense_arch(cfg, 11, "detect")  # 10 categories + the engine's background
    assert (arch["num_queries"], arch["dn_queries"], arch["num_feature_levels"]) == (7, 4, 4)
    model = build_dense_model(arch)
    assert model.num_classes == 10 and model.label_offset == 1 and model.max_per_img == 5 and model.num_queries == 7
    assert model.dn_query_generator.num_dn_queries == 4 and model.backbone.out_indices == (1, 2, 3)
    losses = model.train()([torch.rand(3, 64, 64)], [dict(boxes=torch.tensor([[2.0, 3.0, 40.0, 30.0]]), labels=torch.tensor([10]))])
    assert torch.isfinite(sum(losses.values()))


def _engine_opts(root, out, **kw):
    return dict(dict(data_dir=str(root), output=str(out), epochs=1, batch_size=4, num_workers=0, progress=False, threads=1,
                model_kwargs=TRUNK_ARCH, img_size=64, pretrain_size=64, min_size=[64], max_size=64, backbone_weights=None,
                num_queries=10, dn_queries=6, detections_per_img=10, log_every=1,
                detector_kwargs=dict(embed_dims=32, num_heads=4, num_points=2, ffn_dims=64, num_encoder_layers=1, num_decoder_layers=2)),
                **kw)


def test_dino_resume_mid_epoch_is_exact_under_bf16_autocast(tmp_path):
    pytest.importorskip("pycocotools")
    from transnext.data.dense_demo import write_dense_demo
    from transnext.dense.config import DetectionConfig, resolve_dense_config
    from transnext.dense.train import train_detector
    from transnext.engine.state import load_training_checkpoint
    from transnext.engine.trainer import Callback, TrainingInterrupted

    root = write_dense_demo(tmp_path / "demo", size=64, counts={"train": 8, "val": 2, "test": 2})

    class StopAt(Callback):
        def on_step_end(self, run, loss):
            if run.global_step == 3:
                run.request_stop()

    def cfg(out, **kw):
        return resolve_dense_config(DetectionConfig, "detect_demo_dino", None,
                                    _engine_opts(root, tmp_path / out, epochs=2, deterministic=True, seed=3, amp="bf16", **kw))

    train_detector(cfg("a"))
    with pytest.raises(TrainingInterrupted):
        train_detector(cfg("b"), [StopAt()])
    assert load_training_checkpoint(tmp_path / "b" / "last.pth")["global_step"] == 3  # mid-epoch 2: the denoising noise
    train_detector(cfg("b", resume="auto"))  # and the resize draws must continue as in the uninterrupted run
    a, b = (load_training_checkpoint(tmp_path / d / "last.pth") for d in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"


def test_dino_trains_saves_and_reloads_through_the_engine(tmp_path):
    pytest.importorskip("pycocotools")
    from transnext.data.dense_demo import write_dense_demo
    from transnext.dense.config import DetectionConfig, resolve_dense_config
    from transnext.dense.modeling import dense_model_from_checkpoint
    from transnext.dense.train import train_detector
    from transnext.dense.workflow import evaluate_detection

    root = write_dense_demo(tmp_path / "demo", size=64, counts={"train": 8, "val": 2, "test": 2})
    cfg = resolve_dense_config(DetectionConfig, "detect_demo_dino", None, _engine_opts(root, tmp_path / "run"))
    summary = train_detector(cfg)
    assert "bbox_AP" in summary["best_metrics"]
    model, info = dense_model_from_checkpoint(tmp_path / "run" / "best.pth", task="detect")
    assert info["arch"]["detector"] == "dino" and model.label_offset == 1
    res = evaluate_detection(tmp_path / "run" / "best.pth", root, "val", batch_size=2, num_workers=0, progress=False)
    assert res["metrics"]["bbox_AP"] == pytest.approx(summary["best_metrics"]["bbox_AP"], abs=1e-9)
    assert "segm_AP" not in res["metrics"]


def test_detect_demo_offers_dino(capsys):
    from transnext.cli.main import main
    from transnext.dense.workflow import detection_demo

    with pytest.raises(SystemExit):
        main(["detect", "demo", "--help"])
    text = capsys.readouterr().out
    assert "--model {mask_rcnn,dino}" in text and "detect_demo_dino" in text
    with pytest.raises(ValueError, match="trains mask_rcnn or dino, not 'detr'"):
        detection_demo(model="detr")


def test_mmdet_dino_checkpoint_layout_converts_and_loads():
    from transnext.dense import convert_mmdet_dino, load_reference_checkpoint

    src = _tiny_dino().eval()
    # the reference layout: the trunk's keys without our "model." level, everything else as ours
    theirs = {("backbone." + k[len("backbone.model."):] if k.startswith("backbone.model.") else k): v.clone()
              for k, v in src.state_dict().items()}
    assert set(convert_mmdet_dino({"state_dict": theirs})) == set(src.state_dict())
    dst = _tiny_dino()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    info = load_reference_checkpoint(dst, {"meta": {"dataset_meta": {"classes": ["a", "b", "c"]}}, "state_dict": theirs})
    assert info["kind"] == "mmdet_dino" and info["classes"] == ["a", "b", "c"]
    images, _ = _batch()
    with torch.no_grad():
        a, b = src(images), dst.eval()(images)
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="not an mmdet DINO state dict"):
        convert_mmdet_dino({"backbone.x": torch.zeros(1)})


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from transnext.dense.matching import mean_over_processes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        value = mean_over_processes(float(2 * rank + 1), torch.device("cpu"))  # 1 and 3
        (Path(out_dir) / f"{rank}.txt").write_text(repr(value))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dino_loss_normaliser_is_averaged_over_ddp_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [float((tmp_path / f"{r}.txt").read_text()) for r in (0, 1)] == [2.0, 2.0]
