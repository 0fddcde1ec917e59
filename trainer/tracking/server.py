"""Where MLflow records go and whether that server answers.

The embedded default is a sqlite store ``./mlflow.db`` (artifacts beside it in ``./mlartifacts``),
shared by successive runs so they can be compared; ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``
point at a server instead. Before any compute, ``check_tracking_server`` asks an http(s) server
one quick question; no answer is a one-line error. Every later HTTP request gets a 10 s time-out
and no MLflow retries (``bound_http_requests``), and a failure is classified as the server being
away (``unreachable``: the record may succeed later) or as a rejection of the record.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_DB = "mlflow.db"
HTTP_TIMEOUT_S = 10
PREFLIGHT_TIMEOUT_S = 5


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer (pre-flight, or replay)."""


def resolve_tracking_uri(cli_uri: str | None, recipe_uri: str | None) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the recipe, then ./mlflow.db (sqlite)."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe_uri
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def bound_http_requests() -> None:
    """One HTTP attempt with a 10 s time-out per MLflow request in this process, unless the user
    set MLflow's variables (its defaults retry with back-off for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))


def unreachable(error: BaseException) -> bool:
    """True when ``error`` says the server could not be reached or could not answer now (the
    record may succeed later); False for a rejection of the record itself."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in (401, 403, 408, 429)
    return False


def short_reason(error: BaseException) -> str:
    """A few words for a one-line message: ``connection refused``, ``timed out``, ``HTTP 503``."""
    text = str(error)
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    for code in ("500", "502", "503", "504", "429", "401", "403"):
        if f"{code} error" in lowered or f"error code {code}" in lowered or \
                f"too many {code}" in lowered:
            return f"HTTP {code}"
    line = " ".join(text.split())
    return line[:160] + ("..." if len(line) > 160 else "")


TRAIN_HINT = ("start it, or train with --offline (records stay in the run directory; deliver them "
              "later with `binaryduo tracking replay RUN_DIR`)")


def check_tracking_server(uri: str, hint: str = TRAIN_HINT) -> None:
    """Pre-flight, before any compute: an http(s) tracking server must answer one API request
    within a few seconds, else :class:`TrackingUnavailable` (a one-line message). Only the rank
    that logs (global rank 0, read from RANK / SLURM_PROCID) asks. Other stores are local."""
    if not is_remote(uri):
        return
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    bound_http_requests()
    from mlflow.tracking import MlflowClient

    names = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PREFLIGHT_TIMEOUT_S)  # one quick question
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - every failure here means "not usable"
        raise TrackingUnavailable(
            f"tracking server {uri}: not reachable ({short_reason(error)}); {hint}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
