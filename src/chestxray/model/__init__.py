"""Model: backbones, the classifier network, the decision rule, and loading a trained model."""
