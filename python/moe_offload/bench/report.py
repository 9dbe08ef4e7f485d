"""The benchmark's report: `results.json`, a Markdown table and a plot
(per-token latency CDF per system, and latency against the device budget
for the default policy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_offload.files import atomic_write

COLUMNS = (
    ("median_ms", "median ms/token", "{:.2f}"),
    ("p90_ms", "p90", "{:.2f}"),
    ("p99_ms", "p99", "{:.2f}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("bytes_per_token", "MB/token", "{:.2f}"),
    ("hit_rate", "hit rate", "{:.3f}"),
    ("cpu_experts_per_token", "CPU experts/token", "{:.1f}"),
    ("ratio_to_resident", "x resident", "{:.2f}"),
)
# Which reference a system's tokens were compared with (e2e._check_tokens),
# in the order a system has them.
SAME_TOKENS = (
    "same_tokens_as_resident",
    "same_tokens_as_lru",
    "same_tokens_as_dequantized_resident",
    "same_tokens_as_quantized_lru",
)


def _cell(value: Any, fmt: str, key: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value / 1e6 if key == "bytes_per_token" else value)


def markdown(report: dict[str, Any]) -> str:
    m, machine = report["model"], report["machine"]
    where = machine.get("gpu") or machine["cpu"]
    if machine.get("pcie_generation"):
        where += f", PCIe gen (current, max) {machine['pcie_generation']}"
    lines = [
        f"{m['shape']}: {m['moe_layers']} MoE layers, hidden {m['hidden']}, "
        f"{m['parameters'] / 1e9:.2f} B parameters ({m['expert_bytes'] / 2**30:.2f} GiB of experts), "
        f"{report['settings']['dtype']} on {report['settings']['device']} ({where}); "
        f"commit {report['commit']}",
        "",
        "| system | " + " | ".join(title for _, title, _ in COLUMNS) + " | same tokens |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name, figures in report["systems"].items():
        same = next((figures[key] for key in SAME_TOKENS if key in figures), None)
        cells = [_cell(figures.get(key), fmt, key) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(same, '', '')} |")
    for note in report["notes"]:
        lines.append(f"\n{note}")
    if report.get("command"):
        lines.append(f"\n`{report['command']}`")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (cdf, budget) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, figures in report["systems"].items():
        latencies = sorted(figures["latencies_ms"])
        share = [(i + 1) / len(latencies) for i in range(len(latencies))]
        cdf.step(latencies, share, where="post", label=name)
    cdf.set(xlabel="per-token decode latency (ms)", ylabel="share of tokens", title="latency CDF")
    cdf.set_xscale("log")
    cdf.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    cdf.xaxis.set_major_formatter(ticker.ScalarFormatter())
    cdf.xaxis.set_minor_formatter(ticker.NullFormatter())
    cdf.legend(fontsize=8)
    for scheme, points in _budget_curves(report).items():
        label = "activation-aware, copying" + (f", {scheme}" if scheme else "")
        budget.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if "resident" in report["systems"]:
        budget.axhline(
            report["systems"]["resident"]["median_ms"], color="gray", linestyle="--", label="resident"
        )
    budget.set(
        xlabel="device budget (% of expert bytes)", ylabel="median ms/token", title="latency vs budget"
    )
    budget.legend(fontsize=8)
    fig.suptitle(f"{report['model']['shape']} ({report['settings']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _budget_curves(report: dict[str, Any]) -> dict[str | None, list[tuple[float, float]]]:
    """(device budget, median ms/token) of activation-aware copying every
    miss, per quantization (None: unquantized), by budget."""
    curves: dict[str | None, list[tuple[float, float]]] = {}
    for f in report["systems"].values():
        if f.get("policy") == "activation-aware" and f.get("cpu_experts") == "never":
            curves.setdefault(f.get("quantization"), []).append((f["budget_fraction"], f["median_ms"]))
    return {scheme: sorted(points) for scheme, points in curves.items()}


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The plot first: it is the part that can fail (matplotlib), and then
    # no file of this run has been written.
    atomic_write(out / "latency.png", lambda p: plot(report, p))
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(out / "results.md", lambda p: p.write_text(markdown(report) + "\n"))
