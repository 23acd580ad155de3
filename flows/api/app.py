"""The HTTP API, version 1: file a takedown request, follow it; operators review, promote, hold, roll back.

    POST /v1/requests                  file a request (202): concept, kind, requester (name, contact), evidence;
                                       an Idempotency-Key header gives one request however often it is posted
    GET  /v1/requests/{id}             its status, the history of its status changes, the version and the gate's
                                       verdict: with the status token returned at submission, as the submitter
                                       who filed it, or as an operator
    GET  /v1/requests                  list and filter (operator: every request; submitter: their own)
    POST /v1/requests/{id}/promote     operator: put the request's version in production (force: past its gate)
    POST /v1/requests/{id}/hold        operator: hold for review
    POST /v1/requests/{id}/withdraw    operator: withdraw or reject
    GET  /v1/models/{name}             operator or reader: versions, aliases, lineage of production, history
    POST /v1/models/{name}/rollback    operator: production back to an earlier version
    POST /v1/webhooks                  follow one request (its status token, its submitter, an operator) or every
                                       request (operator): each status change POSTed, signed (flows.api.webhooks)
    DELETE /v1/webhooks/{id}           operator: stop one
    GET  /v1/health                    whether the API answers
    GET  /v1/openapi.json              this API's OpenAPI document

Users authenticate with `Authorization: Bearer <credential>` (`esd user add`, infra.users); what they do is
recorded under their user name. Filing a request needs no credential (the opt-out form is for anyone). Every
action goes through the same functions as the command line and the Prefect flows (flows.cli.submit, promote,
rollback; flows.requests). Contact details stay on the platform: kept under ESD_HOME (0600), never in MLflow
tags, never in a response.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Literal, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra import users
from infra.settings import Settings

MAX_BODY = 64 * 1024
ID_NAMESPACE = uuid.UUID("3c1f9f52-8d2e-4a55-9a43-6a2f3f0f6b11")
PLAIN_WORDS = {"received": "received, waiting to start", "running": "erasing and evaluating",
               "candidate": "evaluated, waiting for review", "promoted": "done: the model no longer produces it",
               "held": "under review by an operator", "failed": "failed; an operator will look at it",
               "withdrawn": "withdrawn"}


class Requester(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, description="who asks (a person or an agency)")
    contact: str = Field(min_length=3, max_length=200, description="how to reach them; never shown again")

    @field_validator("name", "contact")
    @classmethod
    def printable(cls, v: str) -> str:
        if not v.strip() or any(not c.isprintable() for c in v):
            raise ValueError("must be printable text")
        return v.strip()


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urls: list[str] = Field(default_factory=list, max_length=10)
    text: str = Field("", max_length=5000)

    @field_validator("urls")
    @classmethod
    def http_urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if len(u) > 500 or not u.startswith(("http://", "https://")):
                raise ValueError("each URL must start with http:// or https:// and be at most 500 characters")
        return v


class NewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concept: str = Field(min_length=1, max_length=100, description="the style, object or subject to remove")
    kind: Literal["style", "object", "nudity", "custom"]
    requester: Requester
    evidence: Evidence = Field(default_factory=Evidence)
    model: str = Field("toy-sd", max_length=100, description="registered base line")
    consent_to_contact: bool = Field(False, description="the requester agrees to be contacted about this request")

    @field_validator("concept")
    @classmethod
    def concept_ok(cls, v: str) -> str:
        from esd.erase import EraseError, validate_concept

        try:
            return validate_concept(v)
        except EraseError as exc:
            raise ValueError(str(exc)) from None


class Accepted(BaseModel):
    request_id: str
    status_url: str
    status_token: str


class Event(BaseModel):
    status: str
    time: str
    reason: Optional[str] = None


class RequestStatus(BaseModel):
    request_id: str
    concept: str
    kind: str
    model: str
    status: str
    status_text: str
    history: list[Event]
    model_version: Optional[str] = None
    gate: Optional[str] = None
    reason: Optional[str] = None


class RequestSummary(BaseModel):
    request_id: str
    concept: str
    kind: str
    model: str
    status: str
    requester: str
    model_version: Optional[str] = None
    gate: Optional[str] = None
    reason: Optional[str] = None
    created: Optional[float] = None


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500, description="why (recorded in the history)")


class PromoteDecision(Decision):
    force: bool = Field(False, description="promote a version that failed its gate (the reason says why)")


class RollbackDecision(Decision):
    to: Optional[int] = Field(None, ge=1, description="version (default: the previous production)")


class NewWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=500, description="where each status change is POSTed (http or https)")
    request_id: Optional[str] = Field(None, max_length=100, description="the request to follow; none: every "
                                                                        "request (operators only)")
    token: Optional[str] = Field(None, max_length=100, description="the request's status token (for a requester)")

    @field_validator("url")
    @classmethod
    def http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or any(c.isspace() for c in v):
            raise ValueError("must be an http:// or https:// address")
        return v


class Webhook(BaseModel):
    id: str
    secret: str = Field(description="signs every delivery: X-ESD-Signature = sha256=HMAC-SHA256(secret, body)")
    url: str
    request_id: Optional[str]


class RateLimit:
    """At most `per_hour` new requests per requester name, in this process."""

    def __init__(self, per_hour: int):
        self.per_hour, self.seen, self.lock = per_hour, defaultdict(deque), threading.Lock()

    def allow(self, who: str) -> bool:
        now = time.monotonic()
        with self.lock:
            q = self.seen[who.casefold()]
            while q and now - q[0] > 3600:
                q.popleft()
            if len(q) >= self.per_hour:
                return False
            q.append(now)
            return True


def status_token(settings: Settings, request_id: str) -> str:
    """The requester's key to one request's status: an HMAC of its id with a key generated into ESD_HOME."""
    key = settings.generated("api_token_key").encode()
    return hmac.new(key, request_id.encode(), hashlib.sha256).hexdigest()[:40]


def _keep_contact(settings: Settings, request_id: str, body: "NewRequest") -> None:
    d = settings.home / "contacts"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / f"{request_id}.json"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"requester": body.requester.model_dump(), "evidence": body.evidence.model_dump(),
                       "consent_to_contact": body.consent_to_contact, "time": time.time()}, f)


class Desk:
    """What the API's endpoints and its pages do, written once: file a request, read one, list them, and the
    operators' acts through the platform's own functions (flows.cli.submit, promote, rollback; flows.requests).
    Refusals are HTTPExceptions whose detail is one line."""

    def __init__(self, settings: Settings, platform=None):
        self.settings, self._platform = settings, platform
        self.limit = RateLimit(settings.api_rate_per_hour)

    @property
    def platform(self):
        if self._platform is None:
            from flows.platform import Platform

            self._platform = Platform(self.settings)
        return self._platform

    # --- who ---------------------------------------------------------------------------------------------------

    def user(self, token: str | None):
        """The user a credential proves; None without one; 401 for one that proves nobody."""
        if not token:
            return None
        user = users.authenticate(self.settings, token)
        if user is None:
            raise HTTPException(401, "the credential is not valid")
        return user

    @staticmethod
    def require(user, *roles: str, what: str):
        try:
            return users.require(user, *roles, what=what)
        except users.AuthError as exc:
            raise HTTPException(401 if user is None else 403, str(exc)) from None

    def may_read(self, request_id: str, token: str | None, user) -> bool:
        """The status token of the request, the submitter who filed it, or an operator."""
        if user is not None and user.role == "operator":
            return True
        if token and hmac.compare_digest(token, status_token(self.settings, request_id)):
            return True
        req = self.platform.requests.get(request_id) if user is not None else None
        return req is not None and req.requester == _submitter(user)

    # --- requesters --------------------------------------------------------------------------------------------

    def file(self, body: "NewRequest", idempotency_key: str | None, user) -> tuple[str, str]:
        """File and start a request (one per idempotency key); returns its id and status token."""
        from flows.cli import submit
        from flows.requests import RequestError

        if user is not None and user.role not in ("submitter", "operator"):
            raise HTTPException(403, f"user {user.name} is a {user.role}; filing needs role submitter or operator")
        p = self.platform
        if idempotency_key:
            rid = "api-" + str(uuid.uuid5(ID_NAMESPACE, f"{body.requester.name}\n{idempotency_key}"))
            existing = p.requests.get(rid)
        else:
            rid, existing = "api-" + str(uuid.uuid4()), None
        if existing is None and not self.limit.allow(body.requester.name):
            raise HTTPException(429, f"more than {self.limit.per_hour} new requests in an hour from this requester")
        try:
            submit(body.concept, body.kind, body.model,
                   requester=_submitter(user) if user else f"api:{body.requester.name}"[:200], request_id=rid,
                   platform=p)
        except RequestError as exc:
            raise HTTPException(409 if "already used" in str(exc) else 422, str(exc)) from None
        _keep_contact(self.settings, rid, body)     # only for a request that was filed
        return rid, status_token(self.settings, rid)

    def status(self, request_id: str) -> "RequestStatus":
        p = self.platform
        req = self.request(request_id)
        return RequestStatus(request_id=req.request_id, concept=req.concept, kind=req.kind, model=req.model,
                             status=req.status, status_text=PLAIN_WORDS.get(req.status, req.status),
                             history=[Event(**e) for e in p.requests.history(request_id)],
                             model_version=req.model_version, gate=req.gate, reason=req.reason)

    def request(self, request_id: str):
        req = self.platform.requests.get(request_id)
        if req is None:
            raise HTTPException(404, f"no request {request_id}")
        return req

    def list(self, user, status: str | None = None, model: str | None = None, kind: str | None = None,
             limit: int = 100) -> list["RequestSummary"]:
        rows = self.platform.requests.list(status, model, max_results=None if user.role == "submitter" else limit)
        if user.role == "submitter":
            rows = [r for r in rows if r.requester == _submitter(user)]
        return [summary(r) for r in rows if kind is None or r.kind == kind][:limit]

    # --- operators ---------------------------------------------------------------------------------------------

    def promote(self, request_id: str, reason: str, force: bool, user) -> dict:
        from flows.cli import promote

        req = self.request(request_id)
        if req.status not in ("candidate", "held", "promoted") or not req.model_version:
            raise HTTPException(409, f"request {request_id} is {req.status}; only a candidate, held or promoted "
                                     f"request's version can be promoted")
        return _acting(promote, req.model, int(req.model_version), reason, user.actor, force=force,
                       platform=self.platform)

    def hold(self, request_id: str, reason: str, user) -> "RequestSummary":
        self.request(request_id)
        return summary(_acting(self.platform.requests.hold, request_id, reason, user.actor))

    def withdraw(self, request_id: str, reason: str, user) -> "RequestSummary":
        self.request(request_id)
        return summary(_acting(self.platform.requests.withdraw, request_id, reason, user.actor))

    def rollback(self, name: str, reason: str, to: int | None, user) -> dict:
        from flows.cli import rollback

        return _acting(rollback, name, reason, user.actor, to=to, platform=self.platform)

    def model(self, name: str) -> dict:
        from registry import aliases
        from registry.versions import lineage, list_versions

        p = self.platform
        versions = _acting(list_versions, p.store, name)
        production = aliases.current(p.store, name)
        return {"name": name, "versions": versions,
                "aliases": {a: v["version"] for v in versions for a in v["aliases"]},
                "production_lineage": lineage(p.store, name, production) if production else [],
                "history": aliases.history(p.store, name)}

    def evidence(self, request_id: str) -> dict:
        """What an operator reviews: the request's evaluation (metrics, the gate's verdict), its grids' names."""
        req = self.request(request_id)
        out = {"request": summary(req), "evaluation": None, "grids": [], "lineage": []}
        if req.run_id:
            client = self.platform.store.mlflow()
            out["evaluation"] = _load_run_json(client, req.run_id, "evaluation.json")
            out["grids"] = [a.path.split("/")[-1] for a in client.list_artifacts(req.run_id, "grids")]
        if req.model_version:
            from registry.versions import lineage

            out["lineage"] = _acting(lineage, self.platform.store, req.model, req.model_version)
        return out

    def grid(self, request_id: str, name: str) -> bytes:
        """One before/after grid of the request's evaluation, as PNG bytes."""
        import tempfile

        req = self.request(request_id)
        client = self.platform.store.mlflow()
        if not req.run_id or f"grids/{name}" not in [a.path for a in client.list_artifacts(req.run_id, "grids")]:
            raise HTTPException(404, f"request {request_id} has no grid {name}")
        with tempfile.TemporaryDirectory() as tmp:
            from pathlib import Path

            return Path(client.download_artifacts(req.run_id, f"grids/{name}", tmp)).read_bytes()


def _load_run_json(client, run_id: str, path: str):
    """A JSON artifact of a run, or None where the run has none (not evaluated yet)."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    if path not in [a.path for a in client.list_artifacts(run_id)]:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def summary(r) -> RequestSummary:
    return RequestSummary(request_id=r.request_id, concept=r.concept, kind=r.kind, model=r.model, status=r.status,
                          requester=r.requester, model_version=r.model_version, gate=r.gate, reason=r.reason,
                          created=r.created)


def _acting(fn, *args, **kwargs):
    """Run an operator's action; the errors that refuse it become 404/409/422 with their one line."""
    from mlflow.exceptions import MlflowException

    from flows.gate import GateError
    from flows.promotion import ProductionMoved
    from flows.requests import RequestError
    from infra.errors import ReasonRequired
    from registry.store import RegistryError

    try:
        return fn(*args, **kwargs)
    except ReasonRequired as exc:
        raise HTTPException(422, str(exc)) from None
    except (RequestError, RegistryError, GateError, ProductionMoved) as exc:
        text = str(exc).splitlines()[0]
        raise HTTPException(404 if text.startswith(("no request", "no such", "unknown")) else 409, text) from None
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise HTTPException(404, str(exc.message).splitlines()[0]) from None
        raise


def create_app(settings: Settings | None = None, platform=None) -> FastAPI:
    """The app; settings and the platform default to those of the environment (built on first use)."""
    from contextlib import asynccontextmanager

    from flows.api import webhooks

    settings = settings or Settings()
    desk = Desk(settings, platform)

    @asynccontextmanager
    async def lifespan(app):
        dispatcher = webhooks.Dispatcher(settings, lambda: desk.platform, PLAIN_WORDS).start()
        yield
        dispatcher.stop.set()

    app = FastAPI(title="esd-platform", version="1", openapi_url="/v1/openapi.json", docs_url="/v1/docs",
                  redoc_url=None, description="Takedown requests: file one, follow it; operators review and decide.",
                  lifespan=lifespan)
    subscriptions = webhooks.Subscriptions(settings)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        return await call_next(request)

    def caller(authorization: Optional[str] = Header(None, description="Bearer <credential> (esd user add)")):
        return desk.user(_bearer(authorization))

    def role(*roles: str, what: str):
        def check(user=Depends(caller)):
            return desk.require(user, *roles, what=what)
        return check

    @app.get("/v1/health", tags=["meta"])
    def health() -> dict:
        return {"ok": True}

    @app.post("/v1/requests", status_code=202, response_model=Accepted, tags=["requests"],
              responses={403: {"description": "the credential's role may not file"},
                         409: {"description": "the idempotency key is used by another request"},
                         422: {"description": "a field is invalid (named in detail[].loc)"},
                         429: {"description": "too many new requests from this requester"}})
    def file_request(body: NewRequest, request: Request, user=Depends(caller),
                     idempotency_key: Optional[str] = Header(None, max_length=200)) -> Accepted:
        rid, token = desk.file(body, idempotency_key, user)
        return Accepted(request_id=rid, status_url=str(request.url_for("request_status", request_id=rid)),
                        status_token=token)

    @app.get("/v1/requests/{request_id}", response_model=RequestStatus, name="request_status", tags=["requests"],
             responses={401: {"description": "no or a wrong status token or credential"},
                        404: {"description": "no such request"}})
    def read_request(request_id: str, token: Optional[str] = None,
                     authorization: Optional[str] = Header(None)) -> RequestStatus:
        given = token or _bearer(authorization)
        user = desk.user(given) if given.startswith(users.TOKEN_PREFIX) else None
        if not desk.may_read(request_id, given, user):
            raise HTTPException(401, "a request's status needs the status token returned when it was filed, "
                                     "or the credential of whoever filed it, or an operator's")
        return desk.status(request_id)

    who = {401: {"description": "no credential, or one that is not valid"},
           403: {"description": "the credential's role may not do this"}}
    acted = who | {404: {"description": "no such request or model"},
                   409: {"description": "refused in this state (named in detail)"},
                   422: {"description": "a field is invalid (named in detail[].loc)"}}

    @app.get("/v1/requests", response_model=list[RequestSummary], tags=["requests"], responses=who)
    def list_requests(status: Optional[Literal["received", "running", "candidate", "promoted", "held", "failed",
                                               "withdrawn"]] = None,
                      model: Optional[str] = Query(None, max_length=100), kind: Optional[str] = Query(None, max_length=20),
                      limit: int = Query(100, ge=1, le=1000),
                      user=Depends(role("submitter", "operator", what="listing requests"))) -> list[RequestSummary]:
        return desk.list(user, status, model, kind, limit)

    @app.post("/v1/requests/{request_id}/promote", tags=["operators"], responses=acted)
    def promote_request(request_id: str, body: PromoteDecision,
                        user=Depends(role("operator", what="promoting"))) -> dict:
        return desk.promote(request_id, body.reason, body.force, user)

    @app.post("/v1/requests/{request_id}/hold", response_model=RequestSummary, tags=["operators"], responses=acted)
    def hold_request(request_id: str, body: Decision, user=Depends(role("operator", what="holding"))):
        return desk.hold(request_id, body.reason, user)

    @app.post("/v1/requests/{request_id}/withdraw", response_model=RequestSummary, tags=["operators"],
              responses=acted)
    def withdraw_request(request_id: str, body: Decision, user=Depends(role("operator", what="withdrawing"))):
        return desk.withdraw(request_id, body.reason, user)

    @app.get("/v1/models/{name}", tags=["models"], responses=who | {404: {"description": "no such model"}})
    def read_model(name: str, user=Depends(role("operator", "reader", what="reading a model"))) -> dict:
        return desk.model(name)

    @app.post("/v1/models/{name}/rollback", tags=["operators"], responses=acted)
    def rollback_model(name: str, body: RollbackDecision, user=Depends(role("operator", what="rolling back"))):
        return desk.rollback(name, body.reason, body.to, user)

    @app.post("/v1/webhooks", status_code=201, response_model=Webhook, tags=["webhooks"],
              responses=acted | {201: {"description": "registered; the secret is shown this once"}})
    def add_webhook(body: NewWebhook, user=Depends(caller)) -> Webhook:
        if body.request_id is None:
            desk.require(user, "operator", what="a webhook for every request")
        else:
            desk.request(body.request_id)
            if not desk.may_read(body.request_id, body.token, user):
                raise HTTPException(401, "a webhook for a request needs its status token, the credential of "
                                         "whoever filed it, or an operator's")
        owner = user.name if user else f"status-token:{body.request_id}"
        sid, secret = subscriptions.add(body.url, body.request_id, owner)
        return Webhook(id=sid, secret=secret, url=body.url, request_id=body.request_id)

    @app.delete("/v1/webhooks/{webhook_id}", status_code=204, tags=["webhooks"],
                responses=who | {404: {"description": "no such webhook"}})
    def remove_webhook(webhook_id: str, user=Depends(role("operator", what="removing a webhook"))):
        if subscriptions.remove(webhook_id) is None:
            raise HTTPException(404, f"no webhook {webhook_id}")

    from flows.api import pages

    pages.add(app, desk)
    return app


def _bearer(authorization: Optional[str]) -> str:
    return (authorization or "").removeprefix("Bearer ").strip()


def _submitter(user) -> str:
    """The requester recorded for a request a signed-in user filed."""
    return f"user:{user.name}"
