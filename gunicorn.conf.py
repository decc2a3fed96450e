"""Gunicorn settings for serving the app:  gunicorn -c gunicorn.conf.py app:app

One worker process holds one copy of the model (and the rate-limit buckets and the reload lock);
its threads serve requests concurrently. The bind address comes from CHESTXRAY_BIND (environment
or .env; default 127.0.0.1:8000 -- the Dockerfile sets 0.0.0.0:8000). Command-line flags still
override anything here.
"""
from chestxray.serving.config import load_settings

bind = load_settings()["CHESTXRAY_BIND"]
workers = 1
worker_class = "gthread"
threads = 4
timeout = 60  # a prediction with Grad-CAM and a Gemini call (GEMINI_TIMEOUT_S, default 10 s) fits well inside
graceful_timeout = 30
keepalive = 5
control_socket_disable = True  # no runtime management socket: nothing to administer the server through

# Requests: short request lines and few, small headers (the API needs a handful); bodies are capped by the app.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

# No access log: the app's audit log (chestxray.audit) records every API request without client
# addresses, query strings or file names; gunicorn's access log would add the first two.
accesslog = None
errorlog = "-"
loglevel = "info"

# The app's loggers to stderr; the audit logger as bare JSON lines.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json_lines": {"format": "%(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
        "audit": {"class": "logging.StreamHandler", "formatter": "json_lines", "stream": "ext://sys.stderr"},
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "chestxray.audit": {"level": "INFO", "handlers": ["audit"], "propagate": False},
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
    },
}
