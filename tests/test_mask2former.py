"""Mask2Former on TransNeXt: any input size, finite losses on degenerate label maps, inference modes, errors."""

from __future__ import annotations

import pytest
import torch

from transnext.dense.inference import segment_image
from transnext.dense.mask2former import (
    Mask2Former,
    Mask2FormerLoss,
    mask2former_transnext,
    semantic_inference,
    semantic_to_instances,
    uncertain_point_coords,
)

NUM_CLASSES = 5


def tiny(num_classes: int = NUM_CLASSES, **kw) -> Mask2Former:
    torch.manual_seed(0)
    return mask2former_transnext(
        "transnext_micro", num_classes=num_classes, img_size=64, pretrain_size=64, drop_path_rate=0.0, embed_dims=(16, 24, 32, 40),
        num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_queries=4, feat_channels=32, decoder_layers=2,
        encoder_layers=1, head_kwargs=dict(num_heads=2, num_points=2, encoder_ffn_dims=32, decoder_ffn_dims=32, num_groups=8),
        loss_kwargs=dict(num_points=48), **kw)


@pytest.fixture(scope="module")
def model() -> Mask2Former:
    return tiny()


@pytest.mark.parametrize("size", [(64, 64), (77, 101), (96, 45)])
def test_inference_gives_class_scores_at_any_input_size(model, size) -> None:
    model.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        scores = model(x)
    assert scores.shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(scores).all()
    # softmax class shares (< 1 without "no object") times sigmoid masks, summed over 4 queries
    assert scores.min() >= 0 and scores.sum(1).max() <= 4


def _check_losses(model: Mask2Former, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    losses = model(x, labels)
    assert set(losses) == {"loss", "loss_cls", "loss_mask", "loss_dice", "loss_aux"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return losses


def test_losses_are_finite_and_train_on_odd_non_square_crops(model) -> None:
    x = torch.randn(2, 3, 70, 99)
    labels = torch.randint(0, NUM_CLASSES, (2, 70, 99))
    labels[0, :12] = 255
    losses = _check_losses(model, x, labels)
    assert float(losses["loss_mask"]) > 0 and float(losses["loss_dice"]) > 0
    total = losses["loss_cls"] + losses["loss_mask"] + losses["loss_dice"] + losses["loss_aux"]
    assert torch.allclose(losses["loss"], total)


def test_only_ignore_labels_give_a_class_loss_and_zero_mask_losses(model) -> None:
    x = torch.randn(2, 3, 64, 64)
    losses = _check_losses(model, x, torch.full((2, 64, 64), 255))
    assert float(losses["loss_mask"]) == 0.0 and float(losses["loss_dice"]) == 0.0
    assert float(losses["loss_cls"]) > 0  # every query is pushed towards "no object"


def test_only_background_labels_and_a_mixed_batch_train(model) -> None:
    x = torch.randn(2, 3, 64, 80)
    labels = torch.zeros(2, 64, 80, dtype=torch.long)
    labels[1] = 255
    losses = _check_losses(model, x, labels)
    assert float(losses["loss_mask"]) > 0


def test_a_parameter_step_lowers_the_loss_on_a_fixed_batch() -> None:
    m = tiny()
    x = torch.randn(1, 3, 64, 64)
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 20:50, 10:40] = 3
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = m(x, labels)["loss"]
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    torch.manual_seed(1)
    assert float(m(x, labels)["loss"]) < first


def test_whole_and_slide_inference_through_segment_image(model) -> None:
    model.eval()
    x = torch.randn(1, 3, 72, 110)
    whole = segment_image(model, x, mode="whole")
    slide = segment_image(model, x, mode="slide", crop=64, stride=40)
    ms = segment_image(model, x, scales=(0.75, 1.0), flip=True)
    for s in (whole, slide, ms):
        assert s.shape == (1, NUM_CLASSES, 72, 110) and torch.isfinite(s).all()
    assert (whole - slide).abs().max() > 1e-4  # the windows really differ from one pass


def test_state_dict_round_trip_gives_the_same_scores(model, tmp_path) -> None:
    from transnext.checkpoints import load_state_dict, save_state_dict

    model.eval()
    path = save_state_dict(model.state_dict(), tmp_path / "m2f.safetensors")
    other = tiny()
    torch.manual_seed(5)
    for p in other.decode_head.parameters():
        torch.nn.init.normal_(p)
    other.load_state_dict(load_state_dict(path), strict=True)
    other.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_masked_attention_threshold_and_the_all_masked_rule() -> None:
    head = tiny().decode_head
    last = head.mask_embed[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)
    q = torch.zeros(1, 4, 32)
    feats = -torch.ones(1, 32, 6, 8)  # every mask logit -32: sigmoid < 0.5 everywhere
    _, masks, attn = head._predict(q, feats, (3, 4))
    assert (masks < 0).all() and not attn.any(), "a query masked everywhere must attend everywhere"
    feats[..., :3, :] = 1.0  # the top half positive: attended there only
    _, _, attn = head._predict(q, feats, (6, 8))
    assert attn.shape == (head.num_heads * 1, 4, 48)
    grid = attn[0, 0].view(6, 8)
    assert not grid[:3].any() and grid[3:].all()


def test_importance_sampling_prefers_uncertain_points() -> None:
    logits = torch.full((1, 1, 8, 8), 10.0)
    logits[..., :, :4] = 0.0  # the left half sits on the decision boundary
    g = torch.Generator().manual_seed(0)

    def rand(*shape, device=None):
        return torch.rand(*shape, generator=g)

    pts = uncertain_point_coords(logits, 40, 3.0, 0.75, rand)
    assert pts.shape == (1, 40, 2)
    assert (pts[0, :30, 0] < 0.5).float().mean() > 0.95  # the 30 importance points come from the uncertain half


def test_semantic_to_instances_and_inference_formula() -> None:
    lab = torch.tensor([[0, 0, 255], [3, 3, 255]])
    classes, masks = semantic_to_instances(lab, 4)
    assert classes.tolist() == [0, 3] and masks.sum().item() == 4 and not masks[:, :, 2].any()
    cls = torch.randn(1, 3, 3)
    mask_logits = torch.randn(1, 3, 2, 2)
    scores = semantic_inference(cls, mask_logits, (2, 2))
    expected = torch.einsum("qc,qhw->chw", cls[0].softmax(-1)[:, :-1], mask_logits[0].sigmoid())
    assert torch.allclose(scores[0], expected)


def test_bad_inputs_are_refused_with_what_was_expected(model) -> None:
    model.train()
    with pytest.raises(ValueError, match=r"images \[batch, 3, height, width\], got shape \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"at least 32 x 32 pixels \(the stride-32 map\), got \(16, 64\)"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"class ids \[7\] outside 0\.\.4 \(ignore index 255\)"):
        model(torch.randn(1, 3, 64, 64), torch.full((1, 64, 64), 7))
    with pytest.raises(ValueError, match=r"labels must be \[batch, height, width\] label maps matching 2 images"):
        model(torch.randn(2, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer class ids, got dtype torch.float32"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match=r"num_classes must be >= 1"):
        tiny(num_classes=0)
    with pytest.raises(ValueError, match=r"importance_sample_ratio in \[0, 1\]"):
        Mask2FormerLoss(3, importance_sample_ratio=1.5)


# ---------------------------------------------------------------------- engine integration
SEG_HEAD = dict(feat_channels=32, decoder_layers=2, encoder_layers=1, loss_kwargs=dict(num_points=64),
                head_kwargs=dict(num_heads=2, num_points=2, encoder_ffn_dims=32, decoder_ffn_dims=32, num_groups=8))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from transnext.data.dense_demo import write_dense_demo

    return write_dense_demo(tmp_path_factory.mktemp("dense_demo"), size=64, counts={"train": 8, "val": 2, "test": 2})


def _opts(demo_root, out) -> dict:
    trunk = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 4), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
    return dict(dataset="folder", data_dir=str(demo_root), train_split="train", val_split="val", num_classes=11, model_kwargs=trunk,
                img_size=64, drop_path=0.0, epochs=2, batch_size=4, num_workers=0, progress=False, lr=1e-3, crop_size=64,
                resize_scale=(64, 64), deterministic=True, seed=3, foreground_only=False, backbone_weights=None, num_queries=5,
                segmenter_kwargs=SEG_HEAD, output=str(out))


def test_arch_records_build_mask2former_and_old_records_stay_upernet() -> None:
    from transnext.dense import UPerNet
    from transnext.dense.config import SegmentationConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch

    cfg = resolve_dense_config(SegmentationConfig, "segment_demo_mask2former", None, dict(segmenter_kwargs=SEG_HEAD), require_data=False)
    arch = dense_arch(cfg, 11, "segment")
    assert arch["segmenter"] == "mask2former" and arch["num_queries"] == 20
    model = build_dense_model(arch)
    assert isinstance(model, Mask2Former) and model.decode_head.num_queries == 20
    old = {k: v for k, v in arch.items() if k not in ("segmenter", "num_queries", "ignore_index", "segmenter_kwargs")}
    old.update(channels=16, aux_head=True, aux_channels=8)
    assert isinstance(build_dense_model(old), UPerNet)
    with pytest.raises(ValueError, match=r"segmenter must be 'upernet' or 'mask2former', got 'segformer'"):
        resolve_dense_config(SegmentationConfig, None, None, dict(segmenter="segformer"), require_data=False)


def test_engine_trains_evaluates_resumes_exactly_and_reloads(demo_root, tmp_path) -> None:
    from transnext.dense.config import SegmentationConfig, resolve_dense_config
    from transnext.dense.modeling import dense_model_from_checkpoint
    from transnext.dense.train import train_segmenter
    from transnext.engine.state import load_training_checkpoint
    from transnext.engine.trainer import Callback, TrainingInterrupted

    class StopAt(Callback):
        def on_step_end(self, run, loss):
            if run.global_step == 3:
                run.request_stop()

    recipe = "segment_demo_mask2former"
    ref = train_segmenter(resolve_dense_config(SegmentationConfig, recipe, None, _opts(demo_root, tmp_path / "a")))
    assert 0 <= ref["best_metrics"]["mIoU"] <= 100
    with pytest.raises(TrainingInterrupted):
        train_segmenter(resolve_dense_config(SegmentationConfig, recipe, None, _opts(demo_root, tmp_path / "b")), [StopAt()])
    res = train_segmenter(resolve_dense_config(SegmentationConfig, recipe, None, dict(_opts(demo_root, tmp_path / "b"), resume="auto")))
    a, b = (load_training_checkpoint(tmp_path / d / "last.pth") for d in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    assert res["best_metrics"]["mIoU"] == pytest.approx(ref["best_metrics"]["mIoU"])
    model, info = dense_model_from_checkpoint(tmp_path / "a" / "best.pth", task="segment")
    assert isinstance(model, Mask2Former) and info["arch"]["segmenter"] == "mask2former"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 11, 64, 64)


def test_segment_demo_offers_mask2former(capsys) -> None:
    from transnext.cli.main import main
    from transnext.dense.workflow import segmentation_demo

    with pytest.raises(SystemExit):
        main(["segment", "demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model {upernet,mask2former}" in text and "segment_demo_mask2former" in text
    with pytest.raises(ValueError, match=r"the segmentation demo trains upernet or mask2former, not 'segformer'"):
        segmentation_demo(model="segformer")


def test_bf16_autocast_training_step_and_inference_are_finite() -> None:
    m = tiny()
    x = torch.randn(2, 3, 64, 72)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 72))
    labels[1] = 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(x, labels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())  # losses in float32 under autocast
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = m(x)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def _seeded_rand(seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, device=None):
        return torch.rand(*shape, generator=g)

    return rand


def _ddp_case(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    cls = [torch.randn(1, 4, NUM_CLASSES + 1, generator=g)]
    masks = [torch.randn(1, 4, 12, 16, generator=g)]
    labels = torch.full((1, 48, 64), 255)
    for c in range(1 + 2 * rank):  # rank 0: one class present, rank 1: three
        labels[0, :, 16 * c:16 * (c + 1)] = c
    return cls, masks, labels


def _m2f_ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        losses = Mask2FormerLoss(NUM_CLASSES, num_points=32)(*_ddp_case(rank), rand=_seeded_rand(rank))
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps({k: float(v) for k, v in losses.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_mask_loss_normaliser_is_averaged_over_ddp_processes(tmp_path) -> None:
    import json

    import torch.multiprocessing as mp

    mp.spawn(_m2f_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank, own in ((0, 1), (1, 3)):  # matched masks per process; their mean over the two processes is 2
        ddp = json.loads((tmp_path / f"{rank}.json").read_text())
        alone = Mask2FormerLoss(NUM_CLASSES, num_points=32)(*_ddp_case(rank), rand=_seeded_rand(rank))
        assert ddp["loss_cls"] == pytest.approx(float(alone["loss_cls"]), rel=1e-6)  # the class loss is per process
        for k in ("loss_mask", "loss_dice"):
            assert ddp[k] == pytest.approx(float(alone[k]) * own / 2, rel=1e-5), k
