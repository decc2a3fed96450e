# Serves the trained model (artifacts/ from `dvc repro`, or the MLflow registry's champion).
#   docker build -t chestxray .
#   docker run -p 8000:8000 -v "$PWD/artifacts:/app/artifacts:ro" --env-file .env chestxray
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2 \
    CHESTXRAY_BIND=0.0.0.0:8000 CHESTXRAY_ENV=production
WORKDIR /app

# Only the serving set, pinned (requirements/serving.txt: the app, gunicorn, TensorFlow's CPU build, ONNX Runtime,
# MLflow's client): no DVC, no training or test tools. Dockerfile.gpu is the same on TensorFlow's CUDA build.
COPY requirements/serving.txt requirements/serving.txt
RUN pip install -r requirements/serving.txt
COPY pyproject.toml README.md LICENSE ./
COPY src/ src/
COPY config/ config/
COPY app.py gunicorn.conf.py params.yaml ./
# A regular (non-editable) install: the wheel carries the templates and static files as package data.
RUN pip install --no-deps . && rm -rf src build && useradd --create-home app
USER app

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health')" || exit 1
# One worker process holds one copy of the model; threads serve requests concurrently (gunicorn.conf.py).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
