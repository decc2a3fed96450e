"""Evaluation: metrics, threshold choice and plots for a trained classifier."""
