"""Shared fixtures: real servers in a tmp dir, started once per pytest worker per kind, and a tiny random SD folder.

Nothing is mocked. `stack` (S3 + MLflow on SQLite) and `pg_stack` (S3 + MLflow on PostgreSQL) serve the
registry tests; the full stack with the Prefect server and worker starts only where Prefect is needed
(tests/flows). Servers bind to free loopback ports and are stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from infra import stack as stack_lib
from infra.env import environ, quiet  # noqa: F401  (environ: used by the tests that import it from here)
from infra.settings import Settings

quiet()

PG_DSN = dict(host="127.0.0.1", port=5432, dbname="postgres")


# The modules that take minutes, longest first (measured). `make test` runs two workers, each taking a module at a time
# in collection order (--no-loadscope-reorder): started first, the long ones end together instead of one of them
# running alone at the end (measured before: the lanes ended 103 s apart). The bad-input corpus goes first, while its
# platform's MLflow store is small: it compares the whole store before and after each of its cases, which took 30 s
# on a fresh store and 94 s after the retrain over 205 records.
LONGEST_FIRST = ("tests/faults/test_bad_input.py", "tests/faults/test_flow_faults.py", "tests/esd/test_erase_toy.py",
                 "tests/flows/test_api.py", "tests/flows/test_pages.py", "tests/registry/test_registry.py",
                 "tests/flows/test_flows.py", "tests/esd/test_toy.py")

# A closed-form method (one solve, about a second on the toy) for the takedowns of tests where the erasure itself is
# not under test; the style default, with its adversarial rounds, runs in the API and page tests (which cannot choose
# a method, as artists cannot) and in tests/esd/test_erase_toy.py, each with the reduced budget SHORT_ERASE below; its
# quality at its own settings is the benchmark's.
FAST_METHOD = "uce-tokens"


def pytest_collection_modifyitems(config, items) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault table, here because the controlling process of a multi-worker run loads only this conftest."""
    from tests.ledger import summary

    summary(terminalreporter)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a connection's local port (Linux's ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """n ports that are free together with port + 10000 (SeaweedFS puts gRPC there), both below the kernel's
    ephemeral range: a port in it can be taken by any outgoing connection while a stopped server waits to start
    again (seen: SeaweedFS's filer could not listen on its gRPC port after a restart)."""
    top = min(_ephemeral_low() - 10001, 29999)
    chosen: list[int] = []
    while len(chosen) < n:
        p = random.randint(10000, top)
        if (p not in chosen and p + 10000 not in chosen and p - 10000 not in chosen and _port_free(p)
                and _port_free(p + 10000)):
            chosen.append(p)
    return chosen


# One set of server credentials for every stack of a test session: MLflow's and Prefect's clients read theirs from
# the process environment, and several stacks live in one test process. (Generated ones: tests/infra.)
SESSION_MLFLOW_PASSWORD = secrets.token_urlsafe(24)
SESSION_PREFECT_AUTH = "esd:" + secrets.token_urlsafe(24)
os.environ.update({"MLFLOW_TRACKING_USERNAME": Settings().mlflow_username, "MLFLOW_TRACKING_PASSWORD": SESSION_MLFLOW_PASSWORD,
                   "PREFECT_API_AUTH_STRING": SESSION_PREFECT_AUTH})


def stack_settings(home: Path, backend_store_uri: str | None = None, generated: bool = False) -> Settings:
    """Settings for a private stack under home, on free ports. Its credentials file is written first with the
    session's MLflow and Prefect credentials (the rest generated as always), unless GENERATED: all its own."""
    import json

    from infra.settings import GENERATED, ensure_home, write_private

    if not generated and not (home / "credentials.json").exists():
        ensure_home(home)
        values = {k: make() for k, make in GENERATED.items()} | {"mlflow_admin_password": SESSION_MLFLOW_PASSWORD,
                                                                 "prefect_auth_string": SESSION_PREFECT_AUTH}
        write_private(home / "credentials.json", json.dumps(values))
    s3, master, volume, filer, admin, mlflow, prefect, api = free_ports(8)
    return Settings(home=home, s3_port=s3, weed_master_port=master, weed_volume_port=volume, weed_filer_port=filer,
                    weed_admin_port=admin, mlflow_port=mlflow, mlflow_backend_store_uri=backend_store_uri,
                    prefect_port=prefect, api_port=api, prefect_api_url=None, prefect_database_url=None,
                    s3_endpoint=None, mlflow_tracking_uri=None, s3_access_key=None, s3_secret_key=None)


@contextmanager
def local_stack(home: Path, backend_store_uri: str | None = None,
                only: tuple[str, ...] | None = stack_lib.REGISTRY) -> Iterator[Settings]:
    """The services named in ONLY (default: the registry's, S3 + MLflow; None: all) under home."""
    settings = stack_settings(home, backend_store_uri)
    try:
        stack_lib.up(settings, only)
        yield settings
    finally:
        stack_lib.down(settings)


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (trust auth on 127.0.0.1:5432), dropped afterwards; yields its URI."""
    import psycopg2

    name = f"esd_test_{uuid.uuid4().hex[:10]}"
    conn = None
    for user in ("root", "postgres"):
        try:
            conn = psycopg2.connect(user=user, **PG_DSN)
            break
        except psycopg2.OperationalError:
            continue
    if conn is None:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    conn.autocommit = True
    user = conn.info.user
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Settings]:
    """S3 and MLflow on SQLite; yields their Settings."""
    with local_stack(tmp_path_factory.mktemp("stack")) as settings:
        yield settings


@pytest.fixture(scope="session")
def pg_stack(tmp_path_factory) -> Iterator[Settings]:
    """S3 and MLflow on a fresh PostgreSQL database; yields their Settings."""
    with fresh_pg_database() as uri, local_stack(tmp_path_factory.mktemp("pgstack"), uri) as settings:
        yield settings


def build_tiny_sd(folder: Path, seed: int = 0, dtype=None, arch: str = "sd15") -> Path:
    """A tiny random Stable Diffusion folder (32x32 images) at folder/tiny-sd, loadable by esd.models (esd.toy.tiny);
    its weights stored in `dtype` (default float32)."""
    from esd.toy import tiny

    return tiny.build(folder / "tiny-sd", arch, seed, dtype)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Path of a tiny random SD diffusers folder (safetensors, DDIM, no safety checker)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))



# --- the whole platform: Prefect server and worker too --------------------------------------------------------

# What the worker's flow runs read: orchestration is under test with it, not quality (2-step evaluation, the fewest
# whose images the judge still reads, of the quick set: every artist with every shape once; no attack, a gate that
# passes any candidate; tests/flows/test_gate.py tests the gate). ESD_EVAL_STEPS and ESD_EVAL_COLORS set in the
# environment are kept (`make screenshots` judges as the benchmark does, for the README's pictures).
# The reduced erase budget of the tests that run the defaults end to end (the worker's, as the operator's
# ESD_ERASE_DEFAULTS, and tests/esd/test_erase_toy.py's): the style default's textual inversion 15 steps instead of 60,
# the object default 75 iterations instead of 150 (circle at 6 DDIM steps: the same 92.3-point drop, held-out shapes
# 99.1% against 87.2%)
SHORT_ERASE = {"uce-tokens-adv": {"attack_steps": 15}, "esd-u-retain": {"iterations": 75}}
PERMISSIVE = ('{"max_concept_rate": 1.0, "max_regression_rate": 1.0, "min_preservation": 0.0, '
              '"min_class_preservation": 0.0}')
FLOW_ENV = {"ESD_EVAL_STEPS": os.environ.get("ESD_EVAL_STEPS", "2"),
            "ESD_EVAL_COLORS": os.environ.get("ESD_EVAL_COLORS", "1"), "ESD_EVAL_ATTACK": "false",
            "ESD_GATE_STYLE": PERMISSIVE,
            "ESD_GATE_OBJECT": PERMISSIVE, "ESD_GATE_CUSTOM": PERMISSIVE,
            # the reaper runs when a test calls it; a run on its 10-minute schedule would hold the one worker slot
            "ESD_REAP_MINUTES": "1440",
            "ESD_ERASE_DEFAULTS": json.dumps(SHORT_ERASE)}


def platform_env(settings: Settings) -> dict[str, str]:
    """The environment the CLI, Settings() and a (re)started worker read to reach this stack."""
    return FLOW_ENV | settings.to_env() | settings.prefect_env()


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory) -> Iterator[Settings]:
    """Every service, deployments applied, the committed toy base registered as toy-sd; started once for the
    suites that need Prefect (tests/faults, tests/flows). Modules use it through `platform`."""
    from esd.toy import BASE_DIR
    from flows import deploy
    from flows.cli import ensure_base
    from flows.platform import Platform

    with environ(FLOW_ENV):
        settings = stack_settings(tmp_path_factory.mktemp("platform"))    # eval_steps read from FLOW_ENV
    try:
        with environ(FLOW_ENV):
            stack_lib.up(settings)
            with environ(platform_env(settings)):
                deploy.up(settings)
                ensure_base(Platform(settings), "toy-sd", BASE_DIR)
        yield settings
    finally:
        stack_lib.down(settings)


@pytest.fixture(scope="module")
def platform(full_stack):
    """The whole platform as a module's tests see it: Platform(Settings()) read from `platform_env`, which stays
    entered for the module (the CLI and flows called in-process read their settings from the environment)."""
    from flows.platform import Platform

    with environ(platform_env(full_stack)):
        yield Platform(Settings())
