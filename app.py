"""WSGI entry point.

    flask --app app run                                   # development
    gunicorn -w 1 --threads 4 -b 0.0.0.0:8000 app:app     # production (one process: one model in memory)
"""
from chestxray.serving import create_app

app = create_app()
