"""The results.json contract of scripts/evaluate.py (read by the model-card code): schema
"singer-hf/probe-results", version 1, documented in docs/evaluation.md. Metric values are in the units of
the paper's Table 1 (percent for accuracy, mIoU and δ; metres for RMSE)."""

from __future__ import annotations

from .probes import ClassificationProbe, DepthProbe, SegmentationProbe

SCHEMA, SCHEMA_VERSION = "singer-hf/probe-results", 1
DEPTH_METRICS = {
    "rmse": ("RMSE (linear probe)", "m"),
    "abs_rel": ("Absolute relative error (linear probe)", None),
    "delta1": ("δ < 1.25 (linear probe)", "%"),
    "delta2": ("δ < 1.25² (linear probe)", "%"),
    "delta3": ("δ < 1.25³ (linear probe)", "%"),
}


def metric_entries(probe: ClassificationProbe, metrics: dict[str, float]) -> list[dict]:
    """The `metrics` list of one result: {type, name, value, unit}."""
    if isinstance(probe, DepthProbe):
        return [{"type": k, "name": n, "value": round(metrics[k], 4), "unit": u} for k, (n, u) in DEPTH_METRICS.items()]
    name = "mIoU (linear probe)" if isinstance(probe, SegmentationProbe) else "Top-1 accuracy (linear probe)"
    return [{"type": probe.metric, "name": name, "value": round(metrics["value"], 2), "unit": "%"}]


def markdown_table(results: dict) -> str:
    lines = [
        f"Linear probes of `{results['backbone']['name_or_path']}` ({results['backbone']['feature']})",
        "",
        "| task | dataset | split | examples | metric | value |",
        "|---|---|---|---|---|---|",
    ]
    for result in results["results"]:
        dataset = result["dataset"]
        for metric in result["metrics"]:
            unit = f" {metric['unit']}" if metric["unit"] else ""
            lines.append(
                f"| {result['task']} | {dataset['name']} | {dataset['split']} | {dataset['num_examples']} | "
                f"{metric['name']} | {metric['value']}{unit} |"
            )
    return "\n".join(lines) + "\n"
