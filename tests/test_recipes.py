"""The recipe registry (transnext.recipes): every recipe resolves, the old tables are views of it,
published figures are data, the resolver's errors list the names, Weights link to their recipes,
and ``transnext info`` / the dense ``--help`` / ``--print-config`` read it."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from transnext import recipes
from transnext.cli.main import main
from transnext.dense.config import DetectionConfig, SegmentationConfig, resolve_dense_config
from transnext.engine.config import TrainConfig, resolve_config
from transnext.recipes import RECIPES, Recipe, get_recipe, list_recipes, published_text, recipe_config

CONFIG_CLASS = {"classify": TrainConfig, "detect": DetectionConfig, "segment": SegmentationConfig}
# Recipes of heads whose config fields other parts of the library add; their tests turn on by
# themselves once the config class has every option the recipe sets.
NEW_HEAD_RECIPES = {"dino_4scale_12e_tiny", "dino_5scale_12e_tiny", "dino_5scale_12e_small", "dino_5scale_12e_base",
                    "mask2former_160k_tiny", "mask2former_160k_small", "mask2former_160k_base"}


def _missing_fields(name: str) -> list[str]:
    r = RECIPES[name]
    return sorted(set(r.config) - set(CONFIG_CLASS[r.task].__dataclass_fields__))


def _recipe_param(name: str) -> object:
    missing = _missing_fields(name)
    if name in NEW_HEAD_RECIPES and missing:
        return pytest.param(name, marks=pytest.mark.skip(
            reason=f"{CONFIG_CLASS[RECIPES[name].task].__name__} has no {', '.join(missing)} field yet"))
    return name


def _plain(v: object) -> object:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _resolve(name: str) -> TrainConfig:
    r = RECIPES[name]
    if r.task == "classify":
        return resolve_config(name, require_data=False)
    return resolve_dense_config(CONFIG_CLASS[r.task], name, require_data=False)


# ---------------------------------------------------------------------- every recipe resolves
@pytest.mark.parametrize("name", [_recipe_param(n) for n in list_recipes()])
def test_every_recipe_resolves_into_its_config_class(name: str) -> None:
    r = RECIPES[name]
    cfg = _resolve(name)
    assert type(cfg) is CONFIG_CLASS[r.task] and cfg.preset == name
    got = cfg.to_dict()
    for key, value in r.config.items():  # the config holds the recipe's options unchanged
        assert _plain(got[key]) == _plain(value), (name, key, got[key], value)


def test_reference_recipes_have_their_config_fields() -> None:
    # only the new heads may wait for fields; the rest must resolve today
    assert {n for n in list_recipes() if _missing_fields(n)} <= NEW_HEAD_RECIPES


def test_registry_records_are_well_formed() -> None:
    assert set(list_recipes(kind=None)) == set(RECIPES)
    for name, r in RECIPES.items():
        assert r.name == name and r.task in recipes.TASKS and r.kind in recipes.KINDS
        if r.task == "classify":
            assert r.backbone is None
        else:  # a dense record's backbone settings are those its dense_preset names (one source)
            assert r.backbone is RECIPES[r.config["dense_preset"]].backbone
            assert RECIPES[r.config["dense_preset"]].kind == "backbone"
    for name in ("upernet", "upernet_extrapolation", "mask2former", "mask_rcnn", "dino", "dino_4scale"):
        assert RECIPES[name].kind == "backbone"
    for name in list_recipes("detect") + list_recipes("segment"):
        r = RECIPES[name]
        if r.config.get("dataset") != "demo":  # the reference recipes build the trunk as their settings say
            b = r.backbone
            assert (r.config["img_size"], r.config["pretrain_size"], r.config["pos_bias"]) == (b.img_size, b.pretrain_size, b.pos_bias)


def test_new_published_recipes_follow_the_reference() -> None:
    for name, levels, trunk in (("dino_4scale_12e_tiny", 4, "dino_4scale"), ("dino_5scale_12e_base", 5, "dino")):
        c = recipe_config(name)
        assert (c["detector"], c["num_feature_levels"], c["dense_preset"]) == ("dino", levels, trunk)
        assert (c["opt"], c["lr"], c["backbone_lr_mult"], c["weight_decay"], c["clip_grad"]) == ("adamw", 1e-4, 0.1, 0.05, 0.1)
        assert (c["sched"], c["decay_milestones"], c["decay_rate"], c["epochs"]) == ("step", (11,), 0.1, 12)
        assert (c["batch_size"], c["total_batch_size"], c["max_size"]) == (2, 16, 1333)
        assert c["min_size"] == tuple(range(480, 801, 32)) and c["min_size"][-1] == 800
    assert RECIPES["dino_4scale_12e_tiny"].backbone.out_indices == (1, 2, 3)
    assert RECIPES["dino_5scale_12e_tiny"].backbone.out_indices == (0, 1, 2, 3)
    c = recipe_config("mask2former_160k_small")
    assert (c["segmenter"], c["dense_preset"], c["model"], c["num_classes"], c["num_queries"]) == (
        "mask2former", "mask2former", "transnext_small", 150, 100)
    assert (c["lr"], c["weight_decay"], c["backbone_lr_mult"], c["sched"], c["poly_power"]) == (1e-4, 0.05, 0.1, "poly", 0.9)
    assert (c["max_steps"], c["batch_size"], c["total_batch_size"], c["crop_size"], c["clip_grad"]) == (160_000, 2, 16, 512, 0.01)
    assert RECIPES["mask2former_160k_base"].backbone.drop_path_rates["transnext_base"] == 0.6
    # what docs/model.md does not give is said, not invented
    assert "multi-scale" in RECIPES["mask2former_160k_tiny"].notes and "does not state" in RECIPES["dino_5scale_12e_tiny"].notes


# ---------------------------------------------------------------------- the old names are views
def test_old_tables_are_views_of_the_registry() -> None:
    from transnext.dense import DENSE_PRESETS, DensePreset
    from transnext.dense.config import DENSE_RECIPES, PUBLISHED
    from transnext.engine import PRESETS, get_preset
    from transnext.engine.presets import preset_for_model
    from transnext.models import DROP_PATH_RATES

    assert PRESETS == {n: recipe_config(n) for n in list_recipes("classify")}
    assert list(PRESETS) == ["micro", "tiny", "small", "base", "micro_aaaa", "small_384", "base_384", "demo"]
    assert get_preset("transnext_small_384") == recipe_config("small_384")
    assert preset_for_model("transnext_base.in1k_384") == "base_384"
    assert DENSE_RECIPES == {n: recipe_config(n) for t in ("detect", "segment") for n in list_recipes(t)}
    assert DensePreset is recipes.BackboneSettings
    assert DENSE_PRESETS == recipes.backbone_settings()
    assert all(DENSE_PRESETS[n] is RECIPES[n].backbone for n in DENSE_PRESETS)
    assert DROP_PATH_RATES == {"transnext_micro": 0.15, "transnext_tiny": 0.25, "transnext_small": 0.45, "transnext_base": 0.6,
                               "transnext_micro_aaaa": 0.15}
    assert DROP_PATH_RATES == {RECIPES[n].config["model"]: RECIPES[n].config["drop_path"]
                               for n in ("micro", "tiny", "small", "base", "micro_aaaa")}
    # PUBLISHED is rendered from the figures (same text as before the registry)
    assert PUBLISHED == {n: published_text(n) for n in DENSE_RECIPES if RECIPES[n].published}
    assert PUBLISHED["mask_rcnn_1x_tiny"] == "COCO val2017 box AP 49.9, mask AP 44.6"
    assert PUBLISHED["upernet_160k_base"] == "ADE20K val mIoU 53.0"
    assert PUBLISHED["dino_5scale_12e_base"] == "COCO val2017 box AP 57.1"
    assert "detect_demo" not in PUBLISHED and "segment_demo" in DENSE_RECIPES


def test_records_are_read_only_and_configs_are_copies() -> None:
    r = RECIPES["mask_rcnn_1x_tiny"]
    with pytest.raises(TypeError):
        r.config["lr"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        r.published["COCO-val2017"]["box_ap"] = 1.0  # type: ignore[index]
    c = recipe_config(r)
    c["lr"] = 1.0
    assert recipe_config("mask_rcnn_1x_tiny")["lr"] == 1e-4


def test_recipe_config_for_a_variant() -> None:
    assert recipe_config("mask_rcnn_1x_tiny", "small")["model"] == "transnext_small"
    assert recipe_config("dino_5scale_12e_tiny", "transnext_base")["model"] == "transnext_base"
    # the dense trunk takes its drop-path rate from the backbone settings, which publish none for micro
    with pytest.raises(ValueError, match=r"rates for transnext_tiny, transnext_small, transnext_base only, not transnext_micro"):
        recipe_config("upernet_160k_tiny", "micro")
    assert recipe_config("detect_demo", "micro")["model"] == "transnext_micro"  # the demo sets drop_path itself
    with pytest.raises(ValueError, match="variant must be a model name"):
        recipe_config("tiny", "")


# ---------------------------------------------------------------------- published figures are data
def test_published_figures_are_numbers() -> None:
    metrics = {"top1", "mce", "box_ap", "mask_ap", "miou"}
    for r in RECIPES.values():
        for dataset, figures in r.published.items():
            assert isinstance(dataset, str) and figures
            for metric, value in figures.items():
                assert metric in metrics, (r.name, metric)
                assert type(value) in (int, float) and math.isfinite(value) and 0 < value < 100, (r.name, dataset, metric, value)
    box = {n: RECIPES[n].published["COCO-val2017"]["box_ap"] for n in list_recipes("detect") if RECIPES[n].published}
    assert box == {"mask_rcnn_1x_tiny": 49.9, "mask_rcnn_1x_small": 51.1, "mask_rcnn_1x_base": 51.7, "dino_4scale_12e_tiny": 55.1,
                   "dino_5scale_12e_tiny": 55.7, "dino_5scale_12e_small": 56.6, "dino_5scale_12e_base": 57.1}
    miou = {n: RECIPES[n].published["ADE20K-val"]["miou"] for n in list_recipes("segment") if RECIPES[n].published}
    assert miou == {"upernet_160k_tiny": 51.1, "upernet_160k_small": 52.2, "upernet_160k_base": 53.0,
                    "mask2former_160k_tiny": 53.4, "mask2former_160k_small": 54.1, "mask2former_160k_base": 54.7}
    assert RECIPES["base_384"].published["ImageNet-1K"] == {"top1": 86.2}
    with pytest.raises(ValueError, match=r"published\['COCO-val2017'\]\['box_ap'\] must be a finite number, got '55.1'"):
        Recipe("x", "detect", {}, published={"COCO-val2017": {"box_ap": "55.1"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="task must be one of classify, detect, segment, got 'detection'"):
        Recipe("x", "detection", {})


# ---------------------------------------------------------------------- the resolver's errors
def test_unknown_names_list_the_recipes_of_the_task() -> None:
    with pytest.raises(ValueError) as e:
        get_recipe("mask_rcnn_3x", "detect")
    msg = str(e.value)
    assert msg.startswith("unknown recipe 'mask_rcnn_3x' for task 'detect'")
    assert msg.endswith("detect recipes: " + ", ".join(list_recipes("detect")))
    assert "upernet_160k_tiny" not in msg
    with pytest.raises(ValueError, match=r"'mask_rcnn_1x_tny' for task 'detect' \(did you mean 'mask_rcnn_1x_tiny'"):
        get_recipe("mask_rcnn_1x_tny", "detect")
    with pytest.raises(ValueError, match=r"unknown recipe 'mask_rcnn_1x_tiny' for task 'segment' \(it is a detect recipe\); "
                                         r"segment recipes: upernet_160k_tiny"):
        resolve_dense_config(SegmentationConfig, "mask_rcnn_1x_tiny", None, {})
    with pytest.raises(ValueError, match=r"'dino' for task 'detect' \(it names backbone settings, not a training recipe\)"):
        resolve_dense_config(DetectionConfig, "dino", None, {})
    with pytest.raises(ValueError, match="unknown task 'detection'; expected one of classify, detect, segment"):
        list_recipes("detection")
    with pytest.raises(TypeError, match="recipe name must be a str, got int"):
        get_recipe(3)  # type: ignore[arg-type]
    assert get_recipe("dino_4scale").kind == "backbone" and get_recipe("tiny", "classify").weights == ("transnext_tiny.in1k",)


def test_recipe_options_the_config_lacks_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = Recipe("detect_future", "detect", dict(recipe_config("detect_demo"), future_head_width=3), RECIPES["mask_rcnn"].backbone)
    monkeypatch.setitem(RECIPES, "detect_future", bad)
    with pytest.raises(ValueError, match="recipe 'detect_future' sets option.s. future_head_width that DetectionConfig does not have"):
        resolve_dense_config(DetectionConfig, "detect_future", None, {}, require_data=False)


def test_a_new_recipe_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The resolver, the dense --help listing and `info --recipes` read the one table."""
    extra = Recipe("detect_demo_tiny_lr", "detect", dict(recipe_config("detect_demo"), lr=5e-4), RECIPES["mask_rcnn"].backbone,
                   {"COCO-val2017": {"box_ap": 1.5}})
    monkeypatch.setitem(RECIPES, extra.name, extra)
    assert resolve_dense_config(DetectionConfig, extra.name, require_data=False).lr == 5e-4
    with pytest.raises(SystemExit):
        main(["detect", "train", "--help"])
    assert "detect_demo_tiny_lr (COCO val2017 box AP 1.5)" in " ".join(capsys.readouterr().out.split())
    assert main(["info", "--recipes", "--task", "detect"]) == 0
    assert "detect_demo_tiny_lr" in capsys.readouterr().out


# ---------------------------------------------------------------------- Weights link to their recipes
def test_weights_meta_links_to_the_recipe() -> None:
    from transnext.models import WEIGHTS, get_weights

    assert {w.recipe for w in WEIGHTS.values()} == {"micro", "tiny", "small", "base", "micro_aaaa", "small_384", "base_384"}
    for w in WEIGHTS.values():
        r = RECIPES[w.recipe]
        assert w.name in r.weights and r.config["model"] == w.variant and r.config["img_size"] == w.img_size
        assert w.meta["recipe"] == w.recipe
        assert w.meta["_metrics"] == r.published_dict() and w.meta["_metrics"]["ImageNet-1K"]["top1"] == w.top1
    tiny = get_weights("transnext_tiny").meta
    assert tiny["_metrics"]["ImageNet-1K"] == {"top1": 84.0} and tiny["_metrics"]["ImageNet-C"] == {"mce": 46.5}
    assert tiny["_ops"] == 5.7
    small_384 = get_weights("transnext_small.in1k_384")
    assert small_384.meta["recipe"] == "small_384" and small_384.robustness == {
        "imagenet_a": 58.3, "imagenet_r": 56.4, "imagenet_sketch": 43.2, "imagenet_v2": 76.8}
    meta = small_384.meta
    meta["_metrics"]["ImageNet-1K"]["top1"] = 0.0  # a copy: the registry keeps its figure
    assert small_384.meta["_metrics"]["ImageNet-1K"]["top1"] == 86.0


# ---------------------------------------------------------------------- transnext info --recipes
def test_info_prints_recipes_and_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--recipes"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in RECIPES}
    assert list(lines) == list_recipes()
    assert lines["dino_5scale_12e_base"].split()[1:3] == ["detect", "DINO"] and "COCO val2017 box AP 57.1" in lines["dino_5scale_12e_base"]
    assert "ADE20K val mIoU 54.7" in lines["mask2former_160k_base"] and "ImageNet-1K top-1 84.0" in lines["tiny"]
    assert main(["info", "--recipes", "--task", "segment", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_recipes("segment")
    assert rows[0]["published"] == {"ADE20K-val": {"miou": 51.1}} and "160k iterations" in rows[0]["settings"]
    assert main(["info", "--recipes", "upernet_160k_tyni"]) == 1
    assert "unknown recipe 'upernet_160k_tyni' (did you mean 'upernet_160k_tiny'" in capsys.readouterr().err
    assert main(["info", "--recipes", "--measure"]) == 1
    assert "--measure and --robustness apply to the weights table" in capsys.readouterr().err
    assert main(["info", "transnext_tiny", "--format", "json"]) == 0  # the weights rows name their recipe
    assert json.loads(capsys.readouterr().out)[0]["recipe"] == "tiny"


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_help_lists_the_registry(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([task, "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in list_recipes(task):
        shown = f"{name} ({published_text(name)})" if RECIPES[name].published else name
        assert shown in text, shown
    other = "segment" if task == "detect" else "detect"
    assert not any(f" {n} " in text or f" {n};" in text for n in list_recipes(other))


# ---------------------------------------------------------------------- --print-config of the new recipes
def _print_config(task: str, name: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([task, "train", "--preset", name, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_print_config_of_a_reference_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config("detect", "mask_rcnn_1x_small", capsys)
    assert (cfg["preset"], cfg["model"], cfg["lr"], cfg["decay_milestones"]) == ("mask_rcnn_1x_small", "transnext_small", 1e-4, [8.0, 11.0])


@pytest.mark.skipif(bool(_missing_fields("dino_5scale_12e_tiny")),
                    reason=f"DetectionConfig has no {', '.join(_missing_fields('dino_5scale_12e_tiny'))} field yet")
def test_print_config_dino(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config("detect", "dino_5scale_12e_tiny", capsys)
    assert (cfg["detector"], cfg["num_feature_levels"], cfg["num_queries"], cfg["dn_queries"]) == ("dino", 5, 900, 100)
    assert (cfg["lr"], cfg["backbone_lr_mult"], cfg["clip_grad"], cfg["decay_milestones"], cfg["dense_preset"]) == (
        1e-4, 0.1, 0.1, [11.0], "dino")
    assert cfg["min_size"][0] == 480 and cfg["min_size"][-1] == 800 and len(cfg["min_size"]) == 11


@pytest.mark.skipif(bool(_missing_fields("mask2former_160k_tiny")),
                    reason=f"SegmentationConfig has no {', '.join(_missing_fields('mask2former_160k_tiny'))} field yet")
def test_print_config_mask2former(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config("segment", "mask2former_160k_tiny", capsys)
    assert (cfg["segmenter"], cfg["num_queries"], cfg["num_classes"], cfg["dense_preset"]) == ("mask2former", 100, 150, "mask2former")
    assert (cfg["lr"], cfg["poly_power"], cfg["max_steps"], cfg["clip_grad"], cfg["crop_size"]) == (1e-4, 0.9, 160_000, 0.01, 512)


# ---------------------------------------------------------------------- docs generator, leaf module
def test_markdown_generator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--recipes", "--format", "markdown", "--task", "detect"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == recipes.markdown_tables(["detect"])
    out = recipes.markdown_tables().splitlines()  # detection and segmentation, as docs/dense.md shows them
    assert out[0] == "| recipe | task | head | settings | published (ImageNet-1K pretrained trunk) |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out[2:]}
    assert rows["`dino_5scale_12e_tiny` / `_small` / `_base`"].endswith("| COCO val2017 box AP: T 55.7, S 56.6, B 57.1 |")
    assert rows["`mask_rcnn_1x_tiny` / `_small` / `_base`"].endswith(
        "| COCO val2017 box AP / mask AP: T 49.9 / 44.6, S 51.1 / 45.5, B 51.7 / 45.9 |")
    assert "| detect | DINO 4-scale | 12 epochs, AdamW lr 1e-4, trunk lr x0.1" in rows["`dino_4scale_12e_tiny`"]
    assert rows["`mask2former_160k_tiny` / `_small` / `_base`"].endswith("| ADE20K val mIoU: T 53.4, S 54.1, B 54.7 |")
    assert rows["`segment_demo`"].endswith("| - |") and len(rows) == 9
    assert "| segment | Mask2Former | 8 epochs" in rows["`segment_demo_mask2former`"]
    assert "| detect | DINO 4-scale | 6 epochs" in rows["`detect_demo_dino`"]
    classify = recipes.markdown_tables(["classify"]).splitlines()
    assert len(classify) == 2 + len(list_recipes("classify"))
    assert classify[3].startswith("| `tiny` | classify | classifier | 300 epochs, AdamW lr 1e-3, wd 0.05, cosine, warm-up 5 epochs")
    assert classify[3].endswith("ImageNet-V2 top-1 73.8; ImageNet-C mCE 46.5 |")
    assert main(["info", "--recipes", "tiny", "--format", "markdown"]) == 1
    assert "prints whole tasks (--task), not single recipes" in capsys.readouterr().err


def test_recipes_module_is_a_leaf() -> None:
    path = Path(recipes.__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    relative = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    absolute = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    absolute += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    assert relative == [] and not [m for m in absolute if m and m.split(".")[0] in ("torch", "transnext")]
    # loaded on its own (no package, no torch) it builds the whole registry
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('r', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); sys.modules['r'] = m; s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules; print(len(m.RECIPES))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and int(r.stdout) == len(RECIPES), r.stderr
