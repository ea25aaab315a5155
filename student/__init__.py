"""The student room: train a timm classifier on the teachers' labeled set (SPEC §7).

``train_student(job)`` is the stage entry point; ``load_student(folder)`` rebuilds a trained student;
``distillation_loss`` is the KD loss (KL between teacher and student both softened at temperature τ +
cross-entropy to hard labels).
"""
from .loss import distillation_loss
from .model import build_student, load_student
from .train import evaluate, train_student

__all__ = ["train_student", "load_student", "distillation_loss", "build_student", "evaluate"]
