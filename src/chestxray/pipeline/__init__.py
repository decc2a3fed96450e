"""Pipeline stages, one module each, run by DVC as `python -m chestxray.pipeline.<stage>` (see dvc.yaml)."""
