"""Registry fixtures: two stacked deltas of the tiny base, and the stack on each MLflow backend."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.registry.deltas import make_delta


@pytest.fixture(scope="module")
def env(stack) -> dict[str, str]:
    """What the `esd` command line needs to reach the session's registry stack."""
    return {"ESD_HOME": str(stack.home), "ESD_S3_PORT": str(stack.s3_port), "ESD_MLFLOW_PORT": str(stack.mlflow_port)}


@functools.lru_cache(maxsize=None)
def _esd():
    from flows.cli import build_app

    return build_app()


def run(env: dict[str, str], *args: str):
    """`esd ARGS` in this process, in ENV."""
    from typer.testing import CliRunner

    return CliRunner().invoke(_esd(), list(args), env=env)


@pytest.fixture(scope="session")
def deltas(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """Two stacked erasures of the tiny base: 'circle' (-> v2), then 'Vela Moreau' on top (-> v3)."""
    root = tmp_path_factory.mktemp("deltas")
    d2 = make_delta(tiny_sd, root / "circle", ["circle"], seed=1, request_ids=["req-circle"])
    d3 = make_delta(tiny_sd, root / "vela", ["Vela Moreau"], seed=2, prior=d2, parent_version=2,
                    request_ids=["req-vela"])
    return {"circle": d2, "vela": d3}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend_stack(request):
    """The session's stack on each MLflow backend in turn: SQLite, then PostgreSQL."""
    return request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")
