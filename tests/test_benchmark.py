"""Smoke test of the benchmark tool on a tiny configuration (not a timed test)."""

from __future__ import annotations

import json

import pytest

from transnext import benchmark


def test_benchmark_tool_runs_cases_and_writes_table_json_plot(tmp_path, capsys) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "64", "--batch-sizes", "2", "--backends", "torch",
        "--modes", "infer", "train", "--warmup", "0", "--repeats", "1", "--threads", "1",
        "--output", str(out), "--plot", str(png), "--quiet",
    ])
    assert rc == 0
    table = capsys.readouterr().out
    assert "speed x ref" in table and "memory x ref" in table and "matmul rate" in table
    report = json.loads(out.read_text())
    assert report["command"].startswith("transnext benchmark --variants transnext_micro")
    assert report["environment"]["matmul_gflops"] > 0
    results = report["results"]
    assert {(r["backend"], r["mode"]) for r in results} == {
        ("reference", "infer"), ("torch", "infer"), ("reference", "train"), ("torch", "train")}
    for r in results:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0
        assert r["peak_mb"] >= 0 and r["peak_default_mb"] >= 0 and r["peak_reset"]
        assert r["gflops_per_s"] > 0 and 0 < r["matmul_fraction"]
        assert r["flops_per_image"] == pytest.approx(results[0]["flops_per_image"])
    ref = next(r for r in results if r["backend"] == "reference" and r["mode"] == "infer")
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000


def test_benchmark_records_failed_cases(tmp_path) -> None:
    """A case that cannot run (input below the minimum size) is reported, not fatal to the others."""
    rc = benchmark.main([
        "--variants", "transnext_micro", "--sizes", "16", "--batch-sizes", "1", "--backends", "torch",
        "--modes", "infer", "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-matmul-rate",
        "--output", str(tmp_path / "b.json"), "--plot", "", "--quiet",
    ])
    assert rc == 1
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert all("error" in r for r in results)


def test_cli_subcommand_is_wired() -> None:
    from transnext.cli.main import build_parser

    args = build_parser().parse_args(["benchmark", "--sizes", "64", "--modes", "infer"])
    assert args.command == "benchmark" and args.sizes == [64] and args.modes == ["infer"]
