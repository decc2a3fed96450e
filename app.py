"""WSGI entry point.

    flask --app app run                                   # development
    gunicorn -c gunicorn.conf.py app:app                 # production (one process: one model in memory)
"""
from chestxray.serving import create_app

app = create_app()
