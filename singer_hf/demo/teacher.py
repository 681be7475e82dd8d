"""The small Fashion-MNIST ViT that the offline demo (and the evidence study) distils from.

No pretrained ViT can be downloaded offline, so the demo trains its own teacher: a 6-layer,
128-wide ViT on 28x28 images with 4x4 patches (49 tokens), about 1.2M parameters. It trains in a
few CPU minutes and is saved with its ``ViTImageProcessor`` so that ``AutoModel`` and
``AutoImageProcessor.from_pretrained(output_dir)`` load it like any Hub checkpoint.

    python -m singer_hf.demo.teacher --output_dir outputs/demo-teacher
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    set_seed,
)

from ..data import ImageTransform, PixelValuesCollator, build_transforms, image_processor_stats, with_image_transform
from ..hardware import native_cpu_bf16
from .fashion_mnist import FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist


@dataclass
class DemoTeacherArguments:
    output_dir: str = field(default="outputs/demo-teacher", metadata={"help": "Where the model and processor are saved."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training set."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, train this many steps instead of num_train_epochs."})
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N images only."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Report accuracy on the first N test images only."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast; default: on where bf16 is native (a GPU, or a CPU with AMX / AVX512-BF16), "
                  "since elsewhere it runs ~10x slower than fp32."},
    )
    data_dir: str = field(default=FASHION_MNIST_DIR, metadata={"help": "Directory of the Fashion-MNIST idx files."})


def native_bf16() -> bool:
    """Whether this machine computes bf16 matmuls in hardware (without it, CPU bf16 is emulated and slow)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(native_cpu_bf16())


def teacher_config(num_labels: int, id2label: dict[int, str]) -> ViTConfig:
    return ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        layer_norm_eps=1e-6,
        # On CPU with bf16 autocast, eager attention trains this model about 2x faster than SDPA.
        attn_implementation="eager",
        num_labels=num_labels,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )


def train_demo_teacher(args: DemoTeacherArguments) -> tuple[str, float]:
    """Trains, saves to ``args.output_dir`` and returns ``(output_dir, test_accuracy)``."""
    train_set = load_fashion_mnist("train", args.data_dir)
    test_set = load_fashion_mnist("test", args.data_dir)
    if args.max_train_samples is not None:
        train_set = train_set.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train_set))))
    if args.max_test_samples is not None:
        test_set = test_set.select(range(min(args.max_test_samples, len(test_set))))
    names = train_set.features["label"].names

    processor = ViTImageProcessor(
        size={"height": 28, "width": 28}, image_mean=[FASHION_MNIST_MEAN] * 3, image_std=[FASHION_MNIST_STD] * 3
    )
    mean, std, size = image_processor_stats(processor)
    # The eval pipeline (resize + center crop) for training too: within a CPU budget of about one
    # epoch the model underfits, and RandomResizedCrop would only slow it down.
    transforms = build_transforms(mean, std, size, train=False)
    train_set = with_image_transform(train_set, ImageTransform(transforms, "image", "label"))
    test_set = with_image_transform(test_set, ImageTransform(transforms, "image", "label"))

    # Seeded before the weights are drawn: the Trainer seeds only after the model exists.
    set_seed(args.seed)
    model = ViTForImageClassification(teacher_config(len(names), dict(enumerate(names))))
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=512,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        bf16=native_bf16() if args.bf16 is None else args.bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 on CPU needs an explicit use_cpu
        seed=args.seed,
        remove_unused_columns=False,  # the image column is only turned into pixel_values by the transform
        logging_steps=50,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=PixelValuesCollator())
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    prediction = trainer.predict(test_set)
    accuracy = float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))
    trainer.save_model(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"demo teacher: test accuracy {accuracy:.4f} after {train_seconds:.0f} s of training; saved to {args.output_dir}")
    return args.output_dir, accuracy


def main() -> None:
    (cli_args,) = HfArgumentParser(DemoTeacherArguments).parse_args_into_dataclasses()
    train_demo_teacher(cli_args)


if __name__ == "__main__":
    main()
