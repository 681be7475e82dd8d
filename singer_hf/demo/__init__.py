"""The offline demo's own pieces: Fashion-MNIST read from Debian's files, the small ViT teacher
trained on its labels, and a quick L-BFGS linear probe. scripts/demo.py runs them; the evidence
study (benchmarks/evidence.py) builds its teachers and probes with them too.
"""

from .fashion_mnist import FASHION_MNIST_DIR, fashion_mnist_images, load_fashion_mnist
from .probe import linear_probe_accuracy
from .teacher import DemoTeacherArguments, teacher_config, train_demo_teacher

__all__ = [
    "FASHION_MNIST_DIR",
    "DemoTeacherArguments",
    "fashion_mnist_images",
    "linear_probe_accuracy",
    "load_fashion_mnist",
    "teacher_config",
    "train_demo_teacher",
]
