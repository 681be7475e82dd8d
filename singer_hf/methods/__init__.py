"""Distillation methods, one file each, looked up by name (`get_method`); see `base.DistillationMethod`."""

from .base import METHODS, DistillationMethod, MethodFields, get_method, method_label, register_method
from .fitnet import FitNet
from .singer import Singer
from .vitkd import ViTKD

__all__ = ["METHODS", "DistillationMethod", "FitNet", "MethodFields", "Singer", "ViTKD", "get_method", "method_label", "register_method"]
