"""Where everything is: one Settings object, read from ESD_* environment variables.

Local defaults run everything on this machine (SeaweedFS and an MLflow server bound to 127.0.0.1, data under
`<cwd>/.esd`). Setting ESD_S3_ENDPOINT or ESD_MLFLOW_TRACKING_URI points at existing services instead, and the
stack then starts nothing for them.

Default ports avoid PostgreSQL 5432, Redis 6379, MariaDB 3306, RabbitMQ 5672, NATS 4222, Mosquitto 1883,
and Jupyter 8888 (SeaweedFS's own filer default).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


GENERATED = {
    "s3_access_key": lambda: "esd" + secrets.token_hex(8), "s3_secret_key": lambda: secrets.token_urlsafe(30),
    "s3_reader_access_key": lambda: "esdr" + secrets.token_hex(8),
    "s3_reader_secret_key": lambda: secrets.token_urlsafe(30),
    "mlflow_admin_password": lambda: secrets.token_urlsafe(24),
    "mlflow_flask_secret": lambda: secrets.token_urlsafe(32),
    "prefect_auth_string": lambda: "esd:" + secrets.token_urlsafe(24),
    "weed_jwt_key": lambda: secrets.token_urlsafe(32), "api_token_key": lambda: secrets.token_urlsafe(32), "weed_filer_jwt_key": lambda: secrets.token_urlsafe(32),
}


def ensure_home(home: Path) -> None:
    """The data directory, readable by its owner only (0700)."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Replace PATH with TEXT, atomically, in a file only its owner may read (0600 before any byte is in it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def home_lock(home: Path, name: str):
    """An exclusive lock on one of ESD_HOME's files, across processes, held for the block."""
    import fcntl

    ensure_home(home)
    fd = os.open(home / f".{name}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESD_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.cwd() / ".esd", description="data dir: server data, logs, pids, cache")
    host: str = "127.0.0.1"

    # S3. Empty endpoint: a local SeaweedFS (`weed mini`) on s3_port, with keys generated once into home.
    s3_endpoint: str | None = None
    s3_bucket: str = "esd"
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_port: int = 8333
    # SeaweedFS's internal servers; each also uses port + 10000 for gRPC.
    weed_master_port: int = 9333
    weed_volume_port: int = 9340
    weed_filer_port: int = 8383
    weed_admin_port: int = 23646

    # MLflow. Empty tracking uri: a local `mlflow server` on mlflow_port.
    mlflow_tracking_uri: str | None = None
    mlflow_port: int = 5050
    mlflow_backend_store_uri: str | None = Field(None, description="default sqlite:///<home>/mlflow.db; postgresql://... when set")
    mlflow_artifacts_prefix: str = "mlflow"
    mlflow_workers: int = 1

    # Prefect. Empty api url: a local `prefect server start` on prefect_port (SQLite under home by default,
    # PostgreSQL when prefect_database_url is set) and one process worker on this machine.
    prefect_api_url: str | None = None
    prefect_port: int = 4210
    prefect_database_url: str | None = Field(None, description="default sqlite+aiosqlite:///<home>/prefect/prefect.db")
    work_pool: str = "esd"
    worker: bool = True                  # run a worker here (set false on a machine that only submits)
    worker_limit: int = 1                # flow runs at once on this worker; erasures also share the "gpu" limit
    retrain_cron: str = "0 3 * * *"      # nightly consolidation
    retrain_model: str = "toy-sd"
    flow_timeout_s: int = Field(6 * 3600, ge=60, description="a takedown or retrain run longer than this fails")
    reap_minutes: int = Field(10, ge=1, description="how often the reaper fails requests whose flow run is dead")

    # Credentials. Unset for a local service: generated once into <home>/credentials.json (0600) and read from
    # there by every client; for an external service, give the ones it issued.
    mlflow_username: str = "esd-admin"
    mlflow_password: SecretStr | None = None
    mlflow_auth_database_uri: str | None = Field(None, description="default sqlite:///<home>/mlflow-auth.db")
    prefect_auth_string: SecretStr | None = Field(None, description="user:password of the Prefect server's basic auth")

    # The HTTP API (`esd api`, started by `esd stack up` where api is true)
    api: bool = True
    api_port: int = 4212
    api_rate_per_hour: int = Field(20, ge=1, description="new requests per requester per hour")

    # Evaluation inside a takedown or retrain (the toy judge): DDIM steps per image, colors per artist x shape pair
    # (3: the benchmark's 234 images; 1: a quick set of 78 that still draws every artist with every shape), and
    # whether the recovery attack runs (about 30 s a concept on the toy; `esd bench quality` always runs it).
    eval_steps: int = Field(20, ge=1, le=200)
    eval_colors: int = Field(3, ge=1, le=3)
    eval_attack: bool = False

    @property
    def local_prefect(self) -> bool:
        return not self.prefect_api_url

    @property
    def prefect_api(self) -> str:
        return self.prefect_api_url or f"http://{self.host}:{self.prefect_port}/api"

    def to_env(self) -> dict[str, str]:
        """These settings as ESD_* variables, so processes we start (the worker, its flow runs) see the same stack."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[f"ESD_{name.upper()}"] = str(value)
        return out

    def prefect_env(self) -> dict[str, str]:
        """Environment for every process that talks to Prefect (CLI, worker, flow runs)."""
        return {"PREFECT_API_URL": self.prefect_api, "PREFECT_HOME": str((self.home / "prefect").resolve()),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
                "PREFECT_LOCAL_STORAGE_PATH": str((self.home / "prefect" / "results").resolve()),
                "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "ESD_HOME": str(self.home.resolve())} | (
                    {"PREFECT_API_AUTH_STRING": auth} if (auth := self.prefect_auth()) else {})

    @property
    def local_s3(self) -> bool:
        return not self.s3_endpoint

    @property
    def local_mlflow(self) -> bool:
        return not self.mlflow_tracking_uri

    @property
    def s3_url(self) -> str:
        return self.s3_endpoint or f"http://{self.host}:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def backend_store_uri(self) -> str:
        return self.backend_store_uri_for(self.mlflow_backend_store_uri or
                                          f"sqlite:///{(self.home / 'mlflow.db').resolve()}")

    @staticmethod
    def backend_store_uri_for(uri: str) -> str:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver installed here is psycopg2.
        return "postgresql+psycopg2://" + uri.removeprefix("postgresql://") if uri.startswith("postgresql://") else uri

    @property
    def artifacts_destination(self) -> str:
        """Where the MLflow server writes artifacts; the registry reads the same objects directly to verify them."""
        return f"s3://{self.s3_bucket}/{self.mlflow_artifacts_prefix.strip('/')}"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    def generated(self, name: str) -> str:
        """A secret of the local stack (one of GENERATED), made with all the others on first use and kept in
        <home>/credentials.json, created 0600 before anything is written to it (a secret added to GENERATED
        later joins an existing file the same way)."""
        path = self.home / "credentials.json"
        if path.exists() and name in (values := json.loads(path.read_text())):
            return values[name]
        with home_lock(self.home, "credentials"):
            values = json.loads(path.read_text()) if path.exists() else {}
            if name not in values:
                values |= {k: make() for k, make in GENERATED.items() if k not in values}
                write_private(path, json.dumps(values))
        return values[name]

    def s3_keys(self) -> tuple[str, str] | None:
        """The platform's S3 keys (it writes): from settings, else (local S3 only) generated into home.

        None for an external S3 without keys in settings: boto3's own credential chain applies.
        """
        if self.s3_access_key and self.s3_secret_key:
            return self.s3_access_key, self.s3_secret_key.get_secret_value()
        if not self.local_s3:
            return None
        return self.generated("s3_access_key"), self.generated("s3_secret_key")

    def s3_reader_keys(self) -> tuple[str, str] | None:
        """Read-only S3 keys for model consumers (local S3 only: generated into home)."""
        if not self.local_s3:
            return None
        return self.generated("s3_reader_access_key"), self.generated("s3_reader_secret_key")

    def mlflow_credentials(self) -> tuple[str, str] | None:
        """(user, password) for the MLflow server: from settings, else the local server's generated admin."""
        if self.mlflow_password is not None:
            return self.mlflow_username, self.mlflow_password.get_secret_value()
        if not self.local_mlflow:
            return None
        return self.mlflow_username, self.generated("mlflow_admin_password")

    def prefect_auth(self) -> str | None:
        """user:password for the Prefect server's basic auth: from settings, else the local server's generated one."""
        if self.prefect_auth_string is not None:
            return self.prefect_auth_string.get_secret_value()
        if not self.local_prefect:
            return None
        return self.generated("prefect_auth_string")

    def mlflow_env(self) -> dict[str, str]:
        """Environment for every MLflow client (the registry, the served model): its credentials."""
        creds = self.mlflow_credentials()
        return {"MLFLOW_TRACKING_USERNAME": creds[0], "MLFLOW_TRACKING_PASSWORD": creds[1]} if creds else {}

    def client_env(self) -> dict[str, str]:
        """Everything a client process needs to reach this stack: Prefect's address and auth, MLflow's credentials."""
        return self.prefect_env() | self.mlflow_env()

    def s3_env(self) -> dict[str, str]:
        """Environment for processes that talk to S3 through boto3 (the MLflow server)."""
        env = {"MLFLOW_S3_ENDPOINT_URL": self.s3_url, "AWS_DEFAULT_REGION": self.s3_region}
        keys = self.s3_keys()
        if keys:
            env |= {"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1]}
        return env

    def s3_client(self):
        from infra import s3

        return s3.client(self.s3_url, self.s3_region, self.s3_keys())


def actor(given: str | None = None) -> str:
    """Who acts, for the records: the name a caller authenticated (an API user, an operator's ESD_TOKEN, a flow),
    else the administrator who holds ESD_HOME's credentials, as admin:<login>."""
    import getpass

    return (given or "").strip() or f"admin:{getpass.getuser()}"


def settings_error(exc) -> str:
    """A pydantic ValidationError of Settings as one line naming the first refused variable."""
    err = exc.errors()[0]
    name = "ESD_" + str(err["loc"][0]).upper() if err.get("loc") else "an ESD_ setting"
    return f"setting {name} is refused: {err['msg']} (got {err.get('input')!r})"
