"""report.json, report.md and the charts, from one r2r-bench run's figures."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

STAGES = ("encode", "inversion", "generation", "decode")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """min / median / max over the timed passes, per image and per stage."""
    passes = result["passes"]
    per_image = sorted(p["wall_s"] / p["images"] for p in passes)
    stages = {s: statistics.median(p["per_image_s"][s] for p in passes) for s in STAGES}
    fid = result.get("fidelity_vs_torch_reference", {})
    cfg = result["config"]
    return {
        "name": cfg["name"] + (" (r2r-run default)" if cfg.get("default") else ""), "batch": cfg["batch"],
        "latency_s": {"min": per_image[0], "median": statistics.median(per_image), "max": per_image[-1]},
        "stages_s": stages, "images_per_s": 1.0 / statistics.median(per_image),
        "unet_evaluations_per_image": result["unet_evaluations_per_image"],
        "peak_rss_mb": result["peak_rss_mb"],
        "load_s": result.get("load_s"), "canary_s": result.get("canary_s"),
        "psnr_min_db": min(fid["psnr_db"]) if fid.get("psnr_db") else None,
        "max_abs_error": fid.get("max_abs_error"),
    }


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    return "identical" if x == float("inf") else f"{x:.1f}"


def _fmt_open(r: dict[str, Any]) -> str:
    """The time to open a configuration (load, compile or load engines), and its graphs' canaries within it."""
    if r.get("load_s") is None:
        return "-"
    return f"{r['load_s']:.1f}" + (f" ({r['canary_s']:.2f})" if r.get("canary_s") is not None else "")


def markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = report["machine"]
    base = next((r["latency_s"]["median"] for r in rows if r["name"] == "public-code"), None)
    lines = [
        f"# r2r-bench: {Path(report['model']).name} at {report['resolution'][0]}x{report['resolution'][1]}",
        "",
        f"Machine: {m['cpu'].get('model', '?')}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, "
        f"GPU {m['gpu']}; ISA {' '.join(m['cpu'].get('isa', []))}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".  ",
        f"Method: {report['method']}; {report['images']} images, {report['repeats']} timed passes"
        f"{' after a warm-up' if report.get('warmup', True) else ' (no warm-up)'}, each configuration in its own "
        "process.  ",
        f"Command: `{report['command']}`",
        "",
        "| configuration | batch | s / image (min / median / max) | vs public-code | images/s | encode | inversion "
        "| generation | decode | UNet evals / image | peak RSS MB | open s (canaries s) | PSNR vs torch-reference "
        "(min, dB) | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat, st = r["latency_s"], r["stages_s"]
        ratio = f"{base / lat['median']:.2f}x" if base else "-"
        lines.append(
            f"| {r['name']} | {r['batch']} | {lat['min']:.3f} / {lat['median']:.3f} / {lat['max']:.3f} | "
            f"{ratio} | {r['images_per_s']:.2f} | {st['encode']:.3f} | {st['inversion']:.3f} | "
            f"{st['generation']:.3f} | {st['decode']:.3f} | {r['unet_evaluations_per_image']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {_fmt_open(r)} | {_fmt_db(r['psnr_min_db'])} | {r['max_abs_error']} |")
    ho = report["host_overhead"]
    lines += ["", "Host overhead of the coupled scheduler (null graphs with the bundle's I/O, ONNX Runtime CPU, "
              "1 thread): " + "; ".join(f"{k}: {v['ms_per_step_median']:.4f} ms per step (median; min "
                                        f"{v['ms_per_step_min']:.4f})" for k, v in ho.items()) + "."]
    return "\n".join(lines) + "\n"


def charts(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for stage in STAGES:
        vals = [r["stages_s"][stage] for r in rows]
        ax.barh([r["name"] for r in rows], vals, left=left, label=stage)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("seconds per image (median)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("Latency breakdown")
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    batched = [r for r in rows if r["name"].startswith("onnxruntime-fp32-b")]  # the fused program, batch B
    if batched:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["batch"] for r in batched], [r["images_per_s"] for r in batched], marker="o",
                label="onnxruntime fp32 (fused)")
        for r in rows:
            if r["name"] in ("public-code", "torch-reference"):
                ax.axhline(r["images_per_s"], linestyle="--", label=r["name"], color="grey" if
                           r["name"] == "public-code" else "black")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title("Throughput vs batch size")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "throughput.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _portable(obj: Any, out: Path) -> Any:
    """Paths in a report are relative to the run's folder (or bare names): reports travel."""
    if isinstance(obj, dict):
        return {k: _portable(v, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, out) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        p = Path(obj)
        try:
            return str(p.resolve().relative_to(out.resolve()))
        except ValueError:
            return p.name
    return obj


def attention_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# r2r-bench attention: {Path(report['model']).name} at {report['resolution'][0]}x"
        f"{report['resolution'][1]}",
        "",
        f"Machine: {m['cpu'].get('model', '?')}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB.  ",
        "One routed-UNet call on the fused TAC step's batch of 3, profiled by the engine (profiling on), each "
        "configuration in its own process.  ",
        f"Command: `{report['command']}`",
        "",
        "| configuration | attention layers | fused attention nodes | UNet call ms (min) | attention share of UNet "
        "time | peak RSS of the call above the loaded model (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["attention"]:
        name = r["config"]["name"]
        if "failed" in r:
            lines.append(f"| {name} | - | - | failed: {' '.join(r['failed'])} | - | - |")
            continue
        lines.append(f"| {name} | {r['attention_layers']} | {r['fused_attention_nodes']} | {r['call_ms_min']:.0f} | "
                     f"{100 * r['attention_share']:.0f}% | {r['call_peak_above_load_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def ray_markdown(report: dict[str, Any]) -> str:
    m, one, ray = report["machine"], report["ray"]["one_process"], report["ray"]["ray_local"]
    return "\n".join([
        f"# r2r-bench ray: {report['ray']['images']} renders, {report['ray']['backend']} "
        f"{report['ray']['precision']}",
        "",
        f"Machine: {m['cpu'].get('model', '?')}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB.  ",
        f"Command: `{report['command']}`",
        "",
        "| run | wall s | images/s (wall) | images/s (steady) | first output s |",
        "|---|---|---|---|---|",
        f"| r2r-run, one process, {one['threads']} threads | {one['wall_s']:.1f} | {one['images_per_s_wall']:.2f} | "
        f"{one['images_per_s_after_load']:.2f} (after loading) | |",
        f"| r2r-run --ray local, {ray['actors']} actors x 1 thread | {ray['wall_s']:.1f} | "
        f"{ray['images_per_s_wall']:.2f} | {ray['images_per_s_steady']:.2f} | {ray['first_output_s']:.1f} |",
        "",
        f"Translation inside the actors: {ray['translate_s_per_image']:.3f} s per image. Outputs identical to the "
        f"one-process run's: {report['ray']['outputs_identical']}.",
        "",
    ])


def serve_markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["serve"]
    run = s["r2r_run"]
    lines = [f"# r2r-bench serve: {s['rows'][0]['requests']} requests of {s['renders']} renders "
             f"{s['size'][0]}x{s['size'][1]}, {s['backend']} {s['precision']}", "",
             f"Machine: {m['cpu'].get('model', '?')}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB.  ",
             f"Command: `{report['command']}`", "",
             "| batching | concurrency | images/s | p50 s | p95 s | p99 s | errors | mean batch | batch run s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['batching']} (max {r['max_batch_size']}) | {r['concurrency']} | {r['images_per_s']:.2f} "
                     f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | {r['errors']} | "
                     f"{r['mean_batch']:.2f} | {r['mean_run_s']:.2f} |")
    lines += ["", "Latency: from sending a request to the last byte of its answer. Batch run: the "
              "replica's translation of the batch the request ran in (X-R2R-Run-Seconds); the rest of a "
              "latency is waiting and HTTP.", "",
              f"r2r-run on the same renders ({run['images']} images, batch {run['batch']}, one process): "
              f"{run['images_per_s_after_load']:.2f} images/s after loading, {run['images_per_s_wall']:.2f} with "
              f"start-up."]
    return "\n".join(lines) + "\n"


def padding_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# r2r-bench padding: {report['cut']} padded to {report['run']}", "",
             f"Machine: {m['cpu'].get('model', '?')}, {m['logical_cpus']} logical CPUs.  ",
             f"Runtime: {report['runtime']}.  ", f"Command: `{report['command']}`", "",
             "| padding | PSNR against the whole image's translation (dB, mean) | in the border band (dB, mean) |",
             "|---|---|---|"]
    for mode, r in report["padding"].items():
        lines.append(f"| {mode} | {r['psnr_db_mean']:.2f} | {r['border_band_psnr_db_mean']:.2f} |")
    return "\n".join([*lines, "", f"Closer: {report['better']}."]) + "\n"


def write_reports(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json and report.md (and charts, for a run) of any r2r-bench subcommand's report."""
    special = {"ray": ray_markdown, "attention": attention_markdown, "padding": padding_markdown,
               "serve": serve_markdown}
    for key, markdown_of in special.items():
        if key in report:
            report = _portable(report, out)
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
            (out / "report.md").write_text(markdown_of(report))
            return [out / "report.json", out / "report.md"]
    rows = [summarize(r) for r in report["results"]]
    report = _portable({**report, "summary": rows}, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report, rows))
    return [out / "report.json", out / "report.md", *charts(rows, out)]
