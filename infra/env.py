"""The environment every platform process runs in: telemetry off, no hub downloads, no third-party noise.

One place: the `esd` command, the servers the stack starts and the test session all call `quiet()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

# MLflow also stops printing run URLs and progress bars to stdout, which would break `--json` output.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "DIFFUSERS_NO_ADVISORY_WARNINGS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def quiet() -> None:
    """Set the quiet environment (keeping what the user set), a private umask, and silence warnings nobody has to
    act on."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    # What a platform process writes (credentials, caches, databases, logs) is its owner's alone.
    os.umask(0o077)
    # Library deprecation notices and MLflow's progress notes ("waiting for model version") say nothing an
    # operator must act on; MLflow's real warnings and errors still show.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")   # inside MLflow's server
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """os.environ with VALUES, restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
