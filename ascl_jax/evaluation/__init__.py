"""Evaluation of learned features: the weighted kNN monitor."""

from ascl_jax.evaluation.knn import knn_accuracy, knn_predict, l2_normalize

__all__ = ["knn_accuracy", "knn_predict", "l2_normalize"]
