"""Artifact statistics on planted outliers, and scripts/diagnose.py on a tiny SiNGER run folder."""

from __future__ import annotations

import json

import datasets
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import IMAGE, make_vit

from singer_hf import SingerConfig
from singer_hf.commands import diagnose as diagnose_script
from singer_hf.diagnostics import artifact_stats, comparison_figure, norm_histograms_figure, norm_maps_figure, patch_norms
from singer_hf.layout import CONFIG_FILE, DISTILLATION_DIR


def planted(images=5, patches=64, dim=16, outliers=3, scale=10.0, prefix=1):
    """Every patch token of norm 1 except `outliers` per image at `scale`; CLS of norm 2."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(images, prefix + patches, dim, generator=generator), dim=-1)
    for image in range(images):
        chosen = prefix + torch.randperm(patches, generator=generator)[:outliers]
        tokens[image, chosen] *= scale
    tokens[:, :prefix] *= 2
    return tokens


def test_artifact_stats_on_planted_outliers():
    stats = artifact_stats(planted(), prefix_tokens=1, outlier_ratio=4)
    assert stats["num_images"] == 5 and stats["patch_tokens_per_image"] == 64
    assert stats["max_median_ratio"] == pytest.approx({"mean": 10.0, "median": 10.0, "max": 10.0})
    assert stats["outlier_share"] == pytest.approx(3 / 64)
    assert stats["outliers_per_image"] == pytest.approx(3)
    assert stats["patch_norm_quantiles"]["0.5"] == pytest.approx(1.0)
    assert stats["patch_norm_quantiles"]["1"] == pytest.approx(10.0)
    assert stats["cls_norm"]["mean"] == pytest.approx(2.0)  # prefix tokens are not patch tokens
    above = artifact_stats(planted(), prefix_tokens=1, outlier_ratio=12)
    assert above["outlier_share"] == 0.0  # 10× the median is not above 12×
    no_prefix = artifact_stats(planted(prefix=0), prefix_tokens=0)
    assert no_prefix["cls_norm"] is None and no_prefix["outlier_share"] == pytest.approx(3 / 64)


def test_artifact_stats_rejects_bad_input():
    with pytest.raises(ValueError, match=r"features: expected a B×N×D block output, got shape \(4, 16\)"):
        artifact_stats(torch.randn(4, 16), prefix_tokens=1)
    with pytest.raises(ValueError, match=r"prefix_tokens: must lie in \[0, 4\] for 5 tokens, got 5"):
        artifact_stats(torch.randn(2, 5, 8), prefix_tokens=5)


def test_figures_share_one_colour_scale_per_image_and_keep_histograms_readable(tmp_path):
    raw = planted(images=2, patches=49, scale=9.0)  # norms 1 and 9: high-norm artifacts
    refined = planted(images=2, patches=49, scale=1.5)  # norms 1 and 1.5: none
    views = {"teacher": raw, "refined": refined}
    norms = {name: patch_norms(features, 1) for name, features in views.items()}

    maps = norm_maps_figure(torch.rand(2, 7, 7, 3), norms, tmp_path / "maps.png")
    assert "one colour scale per row" in maps._suptitle.get_text()
    panels = maps.axes[:6]  # 2 rows × (image, teacher, refined); the colour bars come after
    for row in range(2):
        teacher_limits, refined_limits = (panels[3 * row + column].images[0].get_clim() for column in (1, 2))
        assert teacher_limits == refined_limits == pytest.approx((1.0, 9.0))  # the refined map on the artifact map's scale
    assert len(maps.axes) == 6 + 2  # one colour bar per row

    views_of_one_image = {name: features[0, 1:] for name, features in views.items()}
    comparison = comparison_figure(torch.rand(7, 7, 3), views_of_one_image, 24, tmp_path / "comparison.png")
    norm_panels = [comparison.axes[4 * row + 1].images[0].get_clim() for row in range(2)]
    assert norm_panels[0] == norm_panels[1] == pytest.approx((1.0, 9.0))
    assert "One colour scale per column" in comparison._suptitle.get_text()

    histograms = norm_histograms_figure(norms, tmp_path / "histograms.png", outlier_ratio=4)
    teacher, refined_axis = histograms.axes[:2]
    assert "log counts" in histograms._suptitle.get_text() and "clipped to the data" in histograms._suptitle.get_text()
    assert teacher.get_yscale() == refined_axis.get_yscale() == "log"
    assert teacher.get_xlim()[1] == pytest.approx(9.24)  # the data's range, the 4× median cut (4.0) inside it
    assert any(line.get_xdata()[0] == pytest.approx(4.0) for line in teacher.get_lines())
    # The refined view's norms end at 1.5: the cut at 4 is named in the legend, not drawn 2.5× further out.
    assert refined_axis.get_xlim()[1] == pytest.approx(1.515)
    assert any("beyond the axis" in text.get_text() for text in refined_axis.get_legend().get_texts())
    for name in ("maps.png", "comparison.png", "histograms.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def singer_run(tmp_path):
    """A teacher folder and a run folder laid out as scripts/distill.py writes them: the student,
    and distillation/ with the teacher's adapters (PEFT format) and the distillation config."""
    teacher_dir, run_dir = tmp_path / "teacher", tmp_path / "run"
    processor = transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE})
    make_vit().save_pretrained(teacher_dir)
    processor.save_pretrained(teacher_dir)
    adapted = peft.get_peft_model(make_vit(), SingerConfig(layers=[3, 5], rank=4))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "singer_up" in name:
                parameter.mul_(5)  # a trained adapter changes the features; the initial one is a projection
    adapted.save_pretrained(run_dir / DISTILLATION_DIR)
    make_vit(hidden=32, layers=4, seed=1).save_pretrained(run_dir)
    config = {"teacher_layers": [3, 5], "student_layers": [2, 3]}
    (run_dir / DISTILLATION_DIR / CONFIG_FILE).write_text(json.dumps(config))
    images = np.random.default_rng(0).integers(0, 255, (6, 40, 40, 3)).astype(np.uint8)
    data = tmp_path / "images.parquet"
    datasets.Dataset.from_dict({"image": list(images)}, features=datasets.Features(image=datasets.Image())).to_parquet(str(data))
    return teacher_dir, run_dir, data


def test_diagnose_raw_refined_and_student(singer_run, tmp_path):
    teacher_dir, run_dir, data = singer_run
    output = tmp_path / "out"
    report = diagnose_script.main(["--model_name_or_path", str(teacher_dir), "--run_dir", str(run_dir), "--dataset_name",
                                   str(data), "--output_dir", str(output), "--num_images", "6", "--figure_images", "2"])  # fmt: skip
    assert set(report["views"]) == {
        "teacher block 3", "refined teacher block 3", "student block 2",
        "teacher block 5", "refined teacher block 5", "student block 3",
    }  # fmt: skip
    assert report["run"] == "run" and report["model"] == "teacher"  # names only, no absolute paths
    assert all(view["num_images"] == 6 for view in report["views"].values())
    raw, refined = report["views"]["teacher block 5"], report["views"]["refined teacher block 5"]
    assert raw["cls_norm"] == refined["cls_norm"]  # the adapter leaves the CLS token alone
    assert raw["patch_norm_quantiles"] != refined["patch_norm_quantiles"]
    assert json.loads((output / "artifact_stats.json").read_text()) == report
    for figure in ("patch_norms.png", "norm_histograms.png", "comparison.png"):
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_rejects_a_folder_that_is_not_a_run(singer_run, tmp_path):
    teacher_dir, _, data = singer_run
    with pytest.raises(ValueError, match=r"run_dir='.*teacher' holds no distillation/distillation_config.json"):
        diagnose_script.main(["--model_name_or_path", str(teacher_dir), "--run_dir", str(teacher_dir),
                              "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])  # fmt: skip
