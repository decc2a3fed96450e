"""Explaining a prediction: Grad-CAM heatmaps (gradcam) and a short text from Google Gemini (gemini)."""
