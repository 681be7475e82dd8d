"""The paper recipes in configs/ and the student model card (offline, no model weights)."""

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from transformers.utils import is_torch_bf16_gpu_available

from singer_hf import DistillationModelConfig, map_layers
from singer_hf.model_card import TEMPLATE_PATH, write_student_card

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
IMAGENET_TRAIN, EPOCHS, GLOBAL_BATCH = 1_281_167, 100, 512
VIT_L = "timm/vit_large_patch16_224.augreg_in21k_ft_in1k"
DEIT3_L = "timm/deit3_large_patch16_224.fb_in22k_ft_in1k"
DEIT3_S = "timm/deit3_small_patch16_224.fb_in22k_ft_in1k"
# recipe -> (teacher, student_size, Table 1 IN-1k top-1)
RECIPES = {
    "vit_l_to_vit_t_singer": (VIT_L, "tiny", "70.59"),
    "vit_l_to_vit_t_fitnet": (VIT_L, "tiny", "62.43"),
    "vit_l_to_vit_s_singer": (VIT_L, "small", "79.13"),
    "vit_l_to_vit_s_fitnet": (VIT_L, "small", "72.50"),
    "deit3_l_to_b_singer": (DEIT3_L, "base", "79.37"),
    "deit3_l_to_b_fitnet": (DEIT3_L, "base", "60.00"),
    "deit3_s_to_t_singer": (DEIT3_S, "tiny", "63.50"),
    "deit3_s_to_t_fitnet": (DEIT3_S, "tiny", "51.41"),
}
# Recipes for the newer families -> (teacher, student_size, the teacher checkpoint's depth). Their
# settings are the paper's; each runs end to end on a stand-in of its family in tests/test_recipes.py.
NEWER_RECIPES = {
    "dinov3_l_to_vit_s_singer": ("facebook/dinov3-vitl16-pretrain-lvd1689m", "small", 24),
    "dinov3_l_to_vit_s_fitnet": ("facebook/dinov3-vitl16-pretrain-lvd1689m", "small", 24),
    "c_radio_h_to_vit_b_singer": ("nvidia/C-RADIOv4-H", "base", 32),
    "siglip2_so400m_to_vit_s_singer": ("google/siglip2-so400m-patch16-naflex", "small", 27),
    "aimv2_l14_to_vit_s16_singer": ("apple/aimv2-large-patch14-224", "small", 24),
}
# Recipes training several students together -> {student: the single-student recipe it must equal}.
GROUP_RECIPES = {
    "vit_l_to_three_students": {
        "vit_t_singer": "vit_l_to_vit_t_singer", "vit_s_singer": "vit_l_to_vit_s_singer", "vit_t_fitnet": "vit_l_to_vit_t_fitnet",
    },
}  # fmt: skip
# Recipes distilling several teachers -> {teacher: the single-teacher recipe whose teacher and blocks it takes}.
TEACHER_RECIPES = {"dinov3_siglip2_to_vit_b": {"dino": "dinov3_l_to_vit_s_singer", "siglip": "siglip2_so400m_to_vit_s_singer"}}
# Paper layers (docs/method.md §3, §6) by teacher depth.
LAYERS = {("singer", 24): [17, 23], ("singer", 12): [8, 11], ("fitnet", 24): [11, 17, 23], ("fitnet", 12): [5, 8, 11]}


@pytest.fixture(scope="module")
def distill_script():
    from singer_hf.commands import distill

    return distill


@lru_cache
def timm_depth(architecture: str) -> int:
    with torch.device("meta"):  # structure only: no weights, no memory, offline
        return len(timm.create_model(architecture, pretrained=False).blocks)


def test_every_paper_recipe_is_there():
    found = {path.stem for path in CONFIGS.glob("*.yaml") if path.name != "demo.yaml"}
    assert found == set(RECIPES) | set(NEWER_RECIPES) | set(GROUP_RECIPES) | set(TEACHER_RECIPES)


@pytest.mark.parametrize("name", sorted(TEACHER_RECIPES))
def test_each_teacher_of_a_several_teachers_recipe_is_distilled_as_in_its_own_recipe(name, distill_script, tmp_path):
    """Each teacher's model and blocks are those of its single-teacher recipe, the method settings the same."""
    model_args, _, args = distill_script.parse_arguments([str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path)])
    teachers = distill_script.run_teachers(model_args, distill_script.run_students(model_args, args))
    assert list(teachers) == list(TEACHER_RECIPES[name])
    for teacher, recipe in TEACHER_RECIPES[name].items():
        own_model, _, own = distill_script.parse_arguments([str(CONFIGS / f"{recipe}.yaml"), "--output_dir", str(tmp_path)])
        entry = teachers[teacher]
        assert (entry.teacher_name_or_path, entry.layers) == (own_model.teacher_name_or_path, own.teacher_layers)
        assert {**args.method_values(), "teacher_layers": None} == {**own.method_values(), "teacher_layers": None}


@pytest.mark.parametrize("name", sorted(GROUP_RECIPES))
def test_group_recipe_trains_each_student_as_its_own_recipe_would(name, distill_script, tmp_path):
    """Each student of a group recipe has the model, method settings, data and optimisation of its own recipe."""
    cpu = [] if is_torch_bf16_gpu_available() else ["--use_cpu", "true"]
    group_model, group_data, group_args = distill_script.parse_arguments([str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path), *cpu])
    students = distill_script.run_students(group_model, group_args)
    assert list(students) == list(GROUP_RECIPES[name])
    bookkeeping = {"output_dir", "logging_dir", "hub_model_id"}
    for student, recipe in GROUP_RECIPES[name].items():
        model_args, data_args, args = distill_script.parse_arguments([str(CONFIGS / f"{recipe}.yaml"), "--output_dir", str(tmp_path), *cpu])
        entry = students[student]
        assert entry.method_values() == args.method_values(), student
        assert (entry.student_size, entry.student_name_or_path) == (model_args.student_size, model_args.student_name_or_path)
        assert group_model.teacher_name_or_path == model_args.teacher_name_or_path and group_data == data_args
        method_fields = set(args.method_values())
        ours = {k: v for k, v in group_args.to_dict().items() if k not in bookkeeping | method_fields}
        theirs = {k: v for k, v in args.to_dict().items() if k not in bookkeeping | method_fields}
        assert ours == theirs, {k: (ours[k], theirs.get(k)) for k in ours if ours[k] != theirs.get(k)}


@pytest.mark.parametrize("name", sorted(NEWER_RECIPES))
def test_newer_family_recipe_parses_and_its_header_holds(name, distill_script, tmp_path):
    path = CONFIGS / f"{name}.yaml"
    teacher, student_size, depth = NEWER_RECIPES[name]
    argv = [str(path), "--output_dir", str(tmp_path)] + ([] if is_torch_bf16_gpu_available() else ["--use_cpu", "true"])
    model_args, data_args, args = distill_script.parse_arguments(argv)
    assert (model_args.teacher_name_or_path, model_args.student_size) == (teacher, student_size)
    method = name.rsplit("_", 1)[1]
    assert args.method == method and max(args.teacher_layers) == depth - 1
    assert args.teacher_layers == args.distillation_config().layers_for(depth) or (method, depth) in LAYERS
    assert args.max_steps == math.ceil(EPOCHS * IMAGENET_TRAIN / GLOBAL_BATCH)
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == GLOBAL_BATCH
    text = path.read_text()
    assert yaml.safe_load(text)["output_dir"] == f"outputs/{name}"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert teacher in header and f"{depth} blocks" in header and ("Why this pair" in header or method == "fitnet")
    assert f"scripts/distill.py configs/{name}.yaml" in header and "hf auth login" in header
    mapping = re.search(r"Teacher blocks → student blocks: (.*)\.", header).group(1)
    student_layers = map_layers(args.teacher_layers, depth, 12)
    assert mapping == ", ".join(f"{t}→{s}" for t, s in zip(args.teacher_layers, student_layers))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_with_the_script_and_matches_the_paper(name, distill_script, tmp_path):
    path = CONFIGS / f"{name}.yaml"
    teacher, student_size, top1 = RECIPES[name]
    argv = [str(path), "--output_dir", str(tmp_path)]
    if not is_torch_bf16_gpu_available():
        argv += ["--use_cpu", "true"]  # bf16 on a machine without a bf16 GPU needs this to validate
    model_args, data_args, args = distill_script.parse_arguments(argv)

    # Models and data.
    assert model_args.teacher_name_or_path == teacher
    assert model_args.student_size == student_size and model_args.student_name_or_path is None
    assert data_args.dataset_name == "ILSVRC/imagenet-1k"
    assert data_args.streaming is True
    assert (data_args.train_split, data_args.image_column, data_args.shuffle_buffer) == ("train", "image", 10_000)

    # The teacher is a real timm pretrained tag, and the layers fit its depth.
    tag = teacher.removeprefix("timm/")
    architecture = tag.split(".")[0]
    assert architecture in timm.list_models()
    assert tag in timm.list_pretrained(architecture + "*")
    depth = timm_depth(architecture)
    method = name.rsplit("_", 1)[1]
    assert args.method == method
    assert args.teacher_layers == LAYERS[(method, depth)]
    config = args.distillation_config()
    if method == "singer":
        assert config.weights() == {"kd": 1.0, "outlier": 0.01, "info": 1.0}
        assert (config.rank, config.null_threshold, config.outlier_quantile) == (64, 0.05, 0.97)
    else:
        assert config.weights() == {"kd": 10.0}

    # Optimisation (docs/method.md §5): 100 epochs of ImageNet-1k at a global batch of 512.
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == GLOBAL_BATCH
    assert args.max_steps == math.ceil(EPOCHS * IMAGENET_TRAIN / GLOBAL_BATCH)
    assert args.max_steps * GLOBAL_BATCH >= EPOCHS * IMAGENET_TRAIN
    assert (args.learning_rate, args.weight_decay, args.adam_beta1, args.adam_beta2) == (1e-3, 1e-4, 0.9, 0.999)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 1e-4}
    assert args.warmup_steps == 0.05
    # bf16 and the workers as the recipe asks (on a CPU without native bf16, or with fewer cores, the run
    # itself uses fp32 and fewer workers: tests/test_distill_script.py)
    recipe = yaml.safe_load(path.read_text())
    assert (recipe["bf16"], recipe["dataloader_num_workers"]) == (True, 8) and args.seed == 0
    assert args.report_to == ["tensorboard"]
    assert (args.logging_steps, args.save_steps, args.save_total_limit) == (50, 5000, 3)

    # The file itself: output folder, header (result, launch line, batch note, mapping).
    text = path.read_text()
    assert yaml.safe_load(text)["output_dir"] == f"outputs/{name}"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert top1 in header
    assert f"accelerate launch --config_file accelerate_configs/multi_gpu_ddp_bf16.yaml scripts/distill.py configs/{name}.yaml" in header
    assert "512" in header and "hf auth login" in header
    mapping = re.search(r"Teacher blocks → student blocks: (.*)\.", header).group(1)
    student_layers = map_layers(args.teacher_layers, depth, 12)
    assert mapping == ", ".join(f"{t}→{s}" for t, s in zip(args.teacher_layers, student_layers))


# -- model card ------------------------------------------------------------------------------------
def distillation_summary(method="singer", teacher_layers=(17, 23), teacher_depth=24, student_depth=12, **kwargs):
    """What FeatureDistillationTrainer writes to distillation/distillation_config.json."""
    config = DistillationModelConfig(method=method, teacher_layers=list(teacher_layers), **kwargs)
    layers = config.layers_for(teacher_depth)
    return {**config.to_dict(), "teacher_layers": layers, "student_layers": map_layers(layers, teacher_depth, student_depth)}


def student_folder(tmp_path, depth=12):
    folder = tmp_path / "vit_l_to_vit_t_singer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "num_hidden_layers": depth}))
    return folder


def test_the_card_template_is_package_data():
    assert TEMPLATE_PATH == ROOT / "singer_hf" / "model_cards" / "student.md" and TEMPLATE_PATH.is_file()


def test_student_card_metadata_and_mapping(tmp_path):
    folder = student_folder(tmp_path)
    training = {"max_steps": 250_228, "num_train_epochs": 3.0, "learning_rate": 1e-3, "hub_token": "hf_" + "x" * 34}
    card = write_student_card(
        folder,
        teacher_name=VIT_L,
        dataset_name="ILSVRC/imagenet-1k",
        distillation=distillation_summary(kd_weight=1.0, outlier_weight=0.01, info_weight=1.0),
        training=training,
    )
    data = ModelCard.load(folder / "README.md").data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert set(data.tags) == {"singer", "knowledge-distillation", "vision-transformer", "image-feature-extraction"}
    assert data.base_model == VIT_L and data.datasets == ["ILSVRC/imagenet-1k"]
    assert data.base_model_relation == "finetune"  # the closest of the relations the Hub accepts
    text = (folder / "README.md").read_text()
    assert text == str(card)
    assert "| 17 | 8 | intermediate |" in text and "| 23 | 11 | final |" in text
    assert "hidden_states[-1]" in text and "AutoModel.from_pretrained" in text and "AutoImageProcessor" in text
    assert "adapter_model.safetensors" in text and "@inproceedings{yu2026singer" in text
    assert "| Loss weights | KD 1, outlier 0.01, information 1 |" in text
    assert "| max_steps | 250228 |" in text and "num_train_epochs" not in text
    assert "hf_xxxx" not in text and "hub_token" not in text


def test_student_card_hides_local_paths(tmp_path):
    folder = student_folder(tmp_path)
    teacher = tmp_path / "teachers" / "my_teacher"
    teacher.mkdir(parents=True)
    dataset = tmp_path / "data" / "fashion.parquet"
    write_student_card(
        folder,
        teacher_name=str(teacher),
        dataset_name=str(dataset),
        distillation=distillation_summary(method="fitnet", teacher_layers=(11, 17, 23)),
        training={"output_dir": str(folder), "note": str(Path.home() / "runs" / "x")},
    )
    text = (folder / "README.md").read_text()
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model is None and data.datasets is None
    assert "my_teacher" in text and "fashion.parquet" in text
    assert str(tmp_path) not in text and str(Path.home()) + "/" not in text
    assert "| 11 | 5 | intermediate |" in text and "adapter_model.safetensors" not in text  # FitNet: no adapters


def test_student_card_points_at_the_distilled_block_when_the_last_one_is_unused(tmp_path):
    folder = student_folder(tmp_path)
    summary = distillation_summary(teacher_layers=(8, 11), teacher_depth=12)  # DeiT-III-S → ViT-T: [7, 10]
    write_student_card(folder, teacher_name=DEIT3_S, dataset_name="ILSVRC/imagenet-1k", distillation=summary)
    text = (folder / "README.md").read_text()
    assert "| 11 | 10 | final |" in text
    assert "outputs.hidden_states[11]" in text and "Student block(s) 11 had no distillation target" in text


def test_student_card_refuses_a_missing_template(tmp_path):
    folder = student_folder(tmp_path)
    with pytest.raises(ValueError, match="template_path: .*missing.md is not a file"):
        write_student_card(
            folder,
            teacher_name=VIT_L,
            dataset_name="ILSVRC/imagenet-1k",
            distillation=distillation_summary(),
            template_path=tmp_path / "missing.md",
        )


def test_student_card_rejects_a_summary_without_the_mapping(tmp_path):
    summary = distillation_summary()
    del summary["student_layers"]
    with pytest.raises(ValueError, match="student_layers"):
        write_student_card(tmp_path / "s", teacher_name=VIT_L, dataset_name="ILSVRC/imagenet-1k", distillation=summary)
