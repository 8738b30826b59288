"""The benchmark tool: smoke runs on tiny configurations (not timed tests), argument checks, and
the ratios of the report computed from given numbers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from transnext import benchmark
from transnext.benchmark import runner
from transnext.benchmark.report import add_peer_ratios, add_reference_ratios, format_peer_table

FAST = ["--warmup", "0", "--repeats", "1", "--threads", "1", "--quiet"]


def test_benchmark_tool_runs_cases_and_writes_table_json_plot(tmp_path, capsys) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "64", "--batch-sizes", "2", "--backends", "torch",
        "--modes", "infer", "train", "--output", str(out), "--plot", str(png), *FAST,
    ])
    assert rc == 0
    table = capsys.readouterr().out
    assert "speed x ref" in table and "memory x ref" in table and "matmul rate" in table
    report = json.loads(out.read_text())
    assert report["command"].startswith("transnext benchmark --variants transnext_micro --sizes 64 ")
    assert report["environment"]["matmul_gflops"] > 0
    results = report["results"]
    assert {(r["backend"], r["mode"]) for r in results} == {
        ("reference", "infer"), ("torch", "infer"), ("reference", "train"), ("torch", "train")}
    for r in results:
        assert "error" not in r, r
        assert r["family"] == "transnext" and r["model"] == "transnext_micro" and r["size"] == [64, 64]
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0
        assert r["peak_mb"] >= 0 and r["peak_default_mb"] >= 0 and r["peak_reset"]
        assert r["gflops_per_s"] > 0 and 0 < r["matmul_fraction"]
        assert r["flops_per_image"] == 2 * r["macs_per_image"] == pytest.approx(results[0]["flops_per_image"])
        assert r["build"] == {"drop_path_rate": 0.0}
    ref = next(r for r in results if r["backend"] == "reference" and r["mode"] == "infer")
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000


def test_benchmark_records_failed_cases(tmp_path) -> None:
    """A case that cannot run (input below the minimum size) is reported, not fatal to the others."""
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "16", "--batch-sizes", "1", "--backends", "torch",
        "--modes", "infer", "--no-matmul-rate", "--output", str(tmp_path / "b.json"), "--plot", "", *FAST,
    ])
    assert rc == 1
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert all("error" in r for r in results)


def test_peers_run_through_the_same_protocol(tmp_path, capsys) -> None:
    """A timm model beside transnext at a non-square size; a fixed-size model (ViT) is built at that size."""
    pytest.importorskip("timm")
    out = tmp_path / "peers.json"
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "64x96", "--batch-sizes", "1", "--backends", "torch", "--no-reference",
        "--peers", "test_vit", "--modes", "infer", "--no-memory-run", "--no-matmul-rate",
        "--output", str(out), "--plot", "", *FAST,
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time x peer" in printed and "test_vit" in printed
    report = json.loads(out.read_text())
    assert "--peers test_vit" in report["command"] and "--sizes 64x96" in report["command"]
    tn, peer = report["results"]
    for r in (tn, peer):
        assert "error" not in r, r
        assert r["size"] == [64, 96] and r["macs_per_image"] > 0 and r["images_per_s"] > 0
    assert peer["model"] == "test_vit" and peer["family"] == "timm" and peer["backend"] is None
    assert peer["build"] == {"drop_path_rate": 0.0, "img_size": [64, 96]}
    ratios = tn["vs_peers"]["test_vit"]
    assert ratios["time"] == pytest.approx(tn["latency_ms"] / peer["latency_ms"])
    assert ratios["macs"] == pytest.approx(tn["macs_per_image"] / peer["macs_per_image"])
    assert ratios["gflops_per_s"] == pytest.approx(tn["gflops_per_s"] / peer["gflops_per_s"])


def test_features_mode_trains_the_backbone_of_transnext_and_of_a_peer(tmp_path) -> None:
    pytest.importorskip("timm")
    out = tmp_path / "features.json"
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "64x96", "--batch-sizes", "1", "--backends", "torch", "--no-reference",
        "--peers", "test_convnext", "--features", "--modes", "train", "--no-memory-run", "--no-matmul-rate",
        "--output", str(out), "--plot", "", *FAST,
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["environment"]["features"] is True and "--features" in report["command"]
    tn, peer = report["results"]
    assert "error" not in tn and "error" not in peer, report["results"]
    assert tn["features"] and peer["features"]
    assert peer["build"] == {"drop_path_rate": 0.0, "features_only": True}  # accepts any size: built as it is
    assert tn["vs_peers"]["test_convnext"]["time"] > 0
    # The backbone alone costs less than the classifier (its head and final pooling are gone).
    from transnext.integrations.flops import measure

    assert 0 < tn["macs_per_image"] <= measure("transnext_micro", (64, 96), include_position_bias=False).macs


def test_features_loss_is_the_sum_of_the_maps_means() -> None:
    from transnext.benchmark.case import _scalar_of

    maps = [torch.full((1, 2, 3, 3), 2.0), torch.arange(4.0).reshape(1, 1, 2, 2)]
    assert _scalar_of(maps).item() == pytest.approx(2.0 + 1.5)
    assert _scalar_of({"0": maps[0], "1": maps[1]}).item() == pytest.approx(3.5)


# ----------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("text, size", [("224", (224, 224)), ("800x1344", (800, 1344)), ("512X768", (512, 768)),
                                        (" 64 x 96 ", (64, 96))])
def test_sizes_are_square_or_height_by_width(text, size) -> None:
    assert runner.parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "800x", "x800", "abc", "800x1344x3", "-5", "0x10", "12.5", ""])
def test_bad_sizes_get_a_clear_error(text, capsys) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected PX|at least 1 pixel"):
        runner.parse_size(text)
    from transnext.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["benchmark", "--sizes", "224", text])
    assert "invalid size" in capsys.readouterr().err


def test_cli_subcommand_is_wired() -> None:
    from transnext.cli.main import build_parser

    args = build_parser().parse_args(["benchmark", "--sizes", "64", "800x1344", "--modes", "infer", "--compile",
                                      "--peers", "convnext_tiny", "--features", "--preset", "mask_rcnn"])
    assert args.command == "benchmark" and args.sizes == [(64, 64), (800, 1344)] and args.modes == ["infer"]
    assert args.compile and args.features and args.peers == ["convnext_tiny"] and args.preset == "mask_rcnn"
    plain = build_parser().parse_args(["benchmark"])
    assert not plain.compile and not plain.features and plain.peers == [] and plain.sizes == [(224, 224)]


def test_compile_flag_adds_a_compiled_copy_of_every_case() -> None:
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--variants", "transnext_micro", "--sizes", "64", "--batch-sizes", "1", "2",
                              "--modes", "infer", "--backends", "torch", "--compile"])
    cases = runner.make_cases(args, ["reference", "torch"])
    assert len(cases) == 2 * 2 * 2  # batch sizes x backends x (eager, compiled)
    assert sum(c["compile"] for c in cases) == 4
    assert {(c["batch"], c["backend"]) for c in cases if c["compile"]} == {(b, be) for b in (1, 2) for be in ("reference", "torch")}
    assert "--compile" in runner.command_line(args)


def test_backends_default_to_the_available_ones_and_are_checked(monkeypatch) -> None:
    from transnext import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert runner.resolve_backends(None, "cpu") == ops.available_backends("cpu") == ["reference", "torch"]
    assert runner.resolve_backends(["torch"], "cpu") == ["reference", "torch"]
    assert runner.resolve_backends(["torch"], "cpu", with_reference=False) == ["torch"]
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        runner.resolve_backends(["fast"], "cpu")
    with pytest.raises(ValueError, match="'triton' cannot run on cpu"):
        runner.resolve_backends(["triton"], "cpu")


def test_unknown_peer_and_preset_are_refused() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="unknown timm model.*not_a_model"):
        runner.check_peers(["convnext_tiny", "not_a_model"])
    with pytest.raises(ValueError, match="unknown preset 'maskrcnn'.*mask_rcnn"):
        runner.check_preset("maskrcnn")


def test_how_models_are_built() -> None:
    """Presets spell out the dense settings; fixed-size peers are built at the benchmarked size."""
    kw, fixed = runner.build_kwargs("transnext", "transnext_tiny", (800, 1344), True, "mask_rcnn", None)
    assert not fixed
    assert kw == {"drop_path_rate": 0.0, "img_size": [800, 800], "pretrain_size": [224, 224], "pos_bias": "interpolate",
                  "out_indices": [0, 1, 2, 3]}
    kw, _ = runner.build_kwargs("transnext", "transnext_tiny", (512, 512), False, "upernet", 7)
    assert kw == {"drop_path_rate": 0.0, "img_size": [512, 512], "pretrain_size": [224, 224], "pos_bias": "interpolate",
                  "fixed_pool_size": 7}
    pytest.importorskip("timm")
    assert runner.build_kwargs("timm", "swin_tiny_patch4_window7_224", (800, 1344), True, "mask_rcnn", None) == (
        {"drop_path_rate": 0.0, "features_only": True, "img_size": [800, 1344]}, True)
    assert runner.build_kwargs("timm", "convnext_tiny", (800, 1344), False, None, None) == ({"drop_path_rate": 0.0}, False)


# ----------------------------------------------------------------------------------------- report
def _result(model, backend, latency_ms, peak_mb, macs, family="transnext", **kw) -> dict:
    base = dict(family=family, model=model, backend=backend, size=[512, 512], batch=2, mode="train", device="cpu",
                dtype="fp32", fixed_pool_size=None, features=True, preset="upernet" if family == "transnext" else None,
                compile=False, latency_ms=latency_ms, images_per_s=2000.0 / latency_ms, peak_mb=peak_mb,
                macs_per_image=macs)
    base["gflops_per_s"] = 2 * macs * 3 * base["images_per_s"] / 1e9
    base.update(kw)
    return base


def test_reference_and_peer_ratios_from_given_numbers(capsys) -> None:
    ref = _result("transnext_tiny", "reference", 8000.0, 3300.0, 60e9)
    fast = _result("transnext_tiny", "torch", 4000.0, 1100.0, 60e9)
    swin = _result("swin_tiny_patch4_window7_224", None, 2000.0, 1000.0, 30e9, family="timm")
    convnext = _result("convnext_tiny", None, 2500.0, 550.0, 20e9, family="timm")
    other_batch = _result("convnext_tiny", None, 100.0, 10.0, 20e9, family="timm", batch=1)
    failed = {**_result("transnext_tiny", "torch", 1.0, 1.0, 1.0, compile=True), "error": "killed"}
    results = [ref, fast, swin, convnext, other_batch, failed]
    add_reference_ratios(results)
    add_peer_ratios(results)
    assert fast["speedup_vs_reference"] == pytest.approx(2.0) and fast["memory_vs_reference"] == pytest.approx(1 / 3)
    assert fast["vs_peers"]["swin_tiny_patch4_window7_224"] == pytest.approx(
        {"time": 2.0, "memory": 1.1, "macs": 2.0, "gflops_per_s": 1.0})
    assert fast["vs_peers"]["convnext_tiny"] == pytest.approx({"time": 1.6, "memory": 2.0, "macs": 3.0, "gflops_per_s": 1.875})
    assert ref["vs_peers"]["convnext_tiny"]["time"] == pytest.approx(3.2)
    assert "vs_peers" not in swin and "speedup_vs_reference" not in swin  # peers carry no ratios of their own
    assert "vs_peers" not in failed
    table = format_peer_table(results)
    assert table.count("convnext_tiny") == 2 and "1.60" in table and "1.88" in table
    assert format_peer_table([_result("transnext_tiny", "torch", 4000.0, 1100.0, 60e9)]) == ""


# ----------------------------------------------------------------------------------------- multiply-adds
def test_counter_measures_any_model_with_hand_computed_macs() -> None:
    from transnext.integrations.flops import measure_factory

    def build(device: str) -> torch.nn.Module:
        with torch.device(device):
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 12, 5))

    c = measure_factory(build, (10, 12))
    assert c.macs == 8 * 3 * 9 * 10 * 12 + 8 * 10 * 12 * 5
    assert c.input_size == (10, 12)
    with pytest.raises(ValueError, match="pass input_size"):
        measure_factory(build)


def test_counter_reproduces_timm_published_macs() -> None:
    """timm's model cards: ConvNeXt-T 4.47 GMACs, Swin-T 4.51 GMACs at 224, to 1 %."""
    timm = pytest.importorskip("timm")
    from transnext.integrations.flops import measure_factory

    for name, gmacs in (("convnext_tiny", 4.47), ("swin_tiny_patch4_window7_224", 4.51)):
        def build(device: str, name=name) -> torch.nn.Module:
            with torch.device(device):
                return timm.create_model(name)

        assert measure_factory(build, (224, 224)).macs / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.slow
def test_compiled_case_runs(tmp_path) -> None:
    """The compile path of the tool, on a small timm model (compiling transnext itself takes minutes on CPU)."""
    pytest.importorskip("timm")
    out = tmp_path / "compiled.json"
    rc = benchmark.main([
        "--variants", "--peers", "test_convnext", "--sizes", "64", "--batch-sizes", "1", "--modes", "infer", "train",
        "--compile", "--no-memory-run", "--no-matmul-rate", "--output", str(out), "--plot", "",
        "--warmup", "1", "--repeats", "1", "--threads", "1", "--quiet",
    ])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["compile"]) for r in results] == [("infer", False), ("infer", True), ("train", False), ("train", True)]
    for r in results:
        assert "error" not in r, r
        assert ("compile_s" in r) == r["compile"] and r["images_per_s"] > 0
    assert all(r["compile_s"] > 0 and r["compile_resident_mb"] is not None for r in results if r["compile"])


def test_nothing_to_run_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to run"):
        benchmark.main(["--variants", "--quiet"])


def test_dense_script_commands_parse(tmp_path) -> None:
    """benchmarks/cpu_dense.sh, with an echo in place of the tool: every command is valid for the parser."""
    import shlex
    import subprocess
    from pathlib import Path

    from transnext.cli.main import build_parser

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_dense.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "TRANSNEXT": "echo", "OUT": str(tmp_path)})
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("benchmark ")]
    assert len(commands) == 5
    parsed = [build_parser().parse_args(cmd) for cmd in commands]
    assert all(a.threads == 2 and a.output.startswith(str(tmp_path)) for a in parsed)
    assert parsed[0].sizes == [(800, 1344)] and parsed[0].features and parsed[0].preset == "mask_rcnn"
    assert parsed[0].peers == ["convnext_tiny", "swin_tiny_patch4_window7_224"]
    assert parsed[1].sizes == [(512, 512)] and parsed[1].batch_sizes == [2] and parsed[1].preset == "upernet"
    assert parsed[3].compile and parsed[4].sizes == [(512, 512), (768, 768), (1024, 1024)]


# ----------------------------------------------------------------------------------------- busy machine
def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")


@needs_proc
def test_busy_processes_burn_cpu_and_are_stopped_on_errors_and_ctrl_c() -> None:
    with runner.busy_processes(2, 60) as procs:
        pids = [p.pid for p in procs]
        start = [_cpu_ticks(pid) for pid in pids]
        time.sleep(0.6)
        assert all(_cpu_ticks(pid) > t for pid, t in zip(pids, start)), "a busy process is not using the CPU"
    assert all(p.returncode is not None for p in procs) and not any(_alive(pid) for pid in pids)
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), runner.busy_processes(1, 60) as procs:
            raise error()
        assert procs[0].returncode is not None and not _alive(procs[0].pid)


@needs_proc
def test_busy_process_ends_when_the_benchmark_is_killed() -> None:
    """Killed without a chance to clean up (SIGKILL), the benchmark leaves no busy process behind."""
    code = ("import sys, time\nfrom transnext.benchmark import runner\n"
            "with runner.busy_processes(1, 120) as procs:\n    print(procs[0].pid, flush=True)\n    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    busy = int(parent.stdout.readline())
    assert _alive(busy)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(busy) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(busy), "the busy process outlived the killed benchmark"


@needs_proc
def test_busy_flag_times_every_case_quiet_and_loaded(tmp_path, capsys) -> None:
    out = tmp_path / "busy.json"
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "64", "--batch-sizes", "2", "--backends", "torch", "--no-reference",
        "--modes", "infer", "--no-matmul-rate", "--no-memory-run", "--busy", "1", "--output", str(out), "--plot", "",
        "--warmup", "0", "--repeats", "2", "--threads", "1", "--quiet",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "loaded x quiet" in printed and "beside 1 busy-looping process" in printed and "faults/step" in printed
    report = json.loads(out.read_text())
    assert report["command"].endswith("--busy 1") and report["environment"]["busy"] == 1
    (r,) = report["results"]
    assert r["busy"] == 1 and r["busy_latency_ms"] > 0 and len(r["busy_times_ms"]) == 2 and len(r["times_ms"]) == 2
    assert r["busy_slowdown"] == pytest.approx(r["busy_latency_ms"] / r["latency_ms"])
    assert r["minor_faults_per_step"] >= 0 and r["busy_minor_faults_per_step"] >= 0 and r["cpu_s_per_step"] > 0
    children = [int(p) for p in open(f"/proc/self/task/{os.getpid()}/children").read().split()]
    assert not [c for c in children if _alive(c)], "busy processes left running"


def test_busy_count_must_be_a_whole_number(capsys) -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["--busy", "-1"])
    assert "--busy: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_loaded_slowdown_against_the_peers_from_given_numbers() -> None:
    tn = _result("transnext_tiny", "torch", 2500.0, 1000.0, 60e9, busy=1, busy_latency_ms=10000.0, busy_slowdown=4.0)
    swin = _result("swin_tiny_patch4_window7_224", None, 1400.0, 900.0, 30e9, family="timm", busy=1,
                   busy_latency_ms=2800.0, busy_slowdown=2.0)
    add_peer_ratios([tn, swin])
    q = tn["vs_peers"]["swin_tiny_patch4_window7_224"]
    assert q["busy_slowdown"] == pytest.approx(2.0) and q["busy_time"] == pytest.approx(10000 / 2800)
    table = format_peer_table([tn, swin])
    assert "slowdown x peer's" in table and "3.57" in table
