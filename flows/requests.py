"""Takedown requests as records: one MLflow run per request in the experiment `takedown-requests`.

The run's `esd.status` tag moves received -> running -> candidate -> promoted | held | failed | withdrawn;
it also carries the Prefect flow run id and the model version, so operators can browse requests in the
MLflow UI and `esd request list/show` answers from the same records.
"""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field

from mlflow.entities import Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from esd.erase import EraseError, validate_concept
from infra.errors import first_line, require_reason
from registry.store import RegistryError
from registry.versions import model_name
from esd.methods import DEFAULT_BY_KIND, get as get_method

EXPERIMENT = "takedown-requests"
KINDS = tuple(DEFAULT_BY_KIND)
STATUSES = ("received", "running", "candidate", "promoted", "held", "failed", "withdrawn")
# Requests whose concept every retrain of their model erases again.
ACTIVE = ("promoted", "candidate", "held")
# The moves a record may make. A run takes a received request; its version becomes a candidate, then production
# (promoted) or waits for an operator (held); an operator may promote a held one, or hold a promoted one whose
# version left production. Withdrawal is possible until withdrawn (a promoted request withdrawn leaves the next
# retrain); a failed request comes back only by an explicit retry. Setting the same status again is a no-op move.
MOVES = {"received": {"running", "failed", "withdrawn"},
         "running": {"candidate", "held", "failed", "withdrawn"},
         "candidate": {"promoted", "held", "failed", "withdrawn"},
         "held": {"promoted", "failed", "withdrawn"},
         "promoted": {"held", "withdrawn"},
         "failed": {"received", "withdrawn"},
         "withdrawn": set()}
FINAL = {"promoted": RunStatus.FINISHED, "held": RunStatus.FINISHED, "withdrawn": RunStatus.KILLED,
         "failed": RunStatus.FAILED}
EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
PAGE = 500      # records per search page


class RequestError(ValueError):
    """A request that cannot be filed or changed; one line naming why."""


@dataclass
class Request:
    concept: str
    kind: str
    model: str
    requester: str = ""
    method: str | None = None
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "received"
    model_version: str | None = None
    flow_run_id: str | None = None
    gate: str | None = None
    run_id: str | None = None
    created: float | None = None
    reason: str | None = None
    attempt: str | None = None          # runs started for this request (a retry starts another)
    runner: str | None = None           # host:pid:start of the process running it (flows.reaper)

    def validate(self) -> "Request":
        try:
            self.concept = validate_concept(self.concept)
        except EraseError as exc:
            raise RequestError(str(exc)) from None
        try:
            model_name(self.model)
        except RegistryError as exc:
            raise RequestError(str(exc)) from None
        if self.kind not in KINDS:
            raise RequestError(f"unknown kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        self.method = self.method or DEFAULT_BY_KIND[self.kind]
        try:
            get_method(self.method)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if EMAIL.search(self.requester or ""):
            raise RequestError("requester must be a reference such as a ticket id, not an e-mail address")
        if len(self.requester) > 200 or any(not c.isprintable() for c in self.requester):
            raise RequestError("requester must be at most 200 printable characters")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}", self.request_id):
            raise RequestError(f"request id {self.request_id!r} must be 1-100 letters, digits, '.', '_', ':' or '-'")
        return self

    def tags(self) -> dict[str, str]:
        keep = {k: v for k, v in asdict(self).items() if v is not None and k not in ("run_id", "created")}
        return {f"esd.{k}": str(v) for k, v in keep.items()}


def causes(exc: BaseException):
    """The exception and those it was raised from or during, innermost last (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class Requests:
    """The request records, over MlflowClient."""

    def __init__(self, client: MlflowClient):
        self.client = client
        exp = client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)

    def file(self, req: Request, stale: float = 30.0) -> tuple[Request, bool]:
        """Record a validated request; the same request id filed twice, even at once, gives one record (the
        second call returns the first record and False).

        The filer first claims the id: an MLflow experiment name, unique in MLflow's store (deleted at once, so
        the UI stays clean; the name stays taken). Whoever loses waits for the winner's record. A claim left
        without a record for STALE seconds (its filer died) is superseded by the next claim number."""
        from mlflow.exceptions import MlflowException

        number = 1
        while (existing := self.get(req.request_id)) is None:
            name = f"{EXPERIMENT}/ids/{req.request_id}#{number}"
            try:
                claim = self.client.create_experiment(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                other = self.client.get_experiment_by_name(name)
                if other is None or time.time() - other.creation_time / 1000 > stale:
                    number += 1
                else:
                    time.sleep(0.2)
                continue
            self.client.delete_experiment(claim)
            # One call makes the whole record (its tags); the params only help browsing in the MLflow UI.
            run = self.client.create_run(self.experiment_id, run_name=f"{req.kind}: {req.concept}"[:250],
                                         tags=req.tags() | _event(req.status, None))
            try:
                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in
                                                               {"concept": req.concept, "kind": req.kind,
                                                                "method": req.method, "model": req.model}.items()])
            except MlflowException:
                pass
            return self.get(req.request_id), True
        return existing, False

    def history(self, request_id: str) -> list[dict]:
        """The request's status changes, oldest first: {"status", "time" (ISO 8601, UTC), "reason"}."""
        run = self.client.get_run(self.require(request_id).run_id)
        events = [json.loads(v) for k, v in run.data.tags.items() if k.startswith(EVENT_PREFIX)]
        return sorted(events, key=lambda e: e["time"])

    def get(self, request_id: str) -> Request | None:
        runs = self.client.search_runs([self.experiment_id], f"tags.`esd.request_id` = '{_quote(request_id)}'",
                                       max_results=2)
        return _from_run(runs[0]) if runs else None

    def require(self, request_id: str) -> Request:
        req = self.get(request_id)
        if req is None:
            raise RequestError(f"no request with id {request_id!r}")
        return req

    def list(self, status: str | None = None, model: str | None = None, max_results: int | None = 200) -> list[Request]:
        """Requests, newest first, filtered by the server on status and model; max_results None: all of them,
        page by page."""
        query = " and ".join(f"tags.`esd.{k}` = '{_quote(v)}'" for k, v in (("status", status), ("model", model)) if v)
        runs, token = [], None
        while max_results is None or len(runs) < max_results:
            size = PAGE if max_results is None else min(PAGE, max_results - len(runs))
            page = self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time DESC"],
                                           max_results=size, page_token=token)
            runs += page
            token = page.token
            if not token:
                break
        return [_from_run(r) for r in runs]

    def update(self, request_id: str, status: str | None = None, **fields) -> Request:
        """Set the status and any other fields; a final status also ends the MLflow run."""
        req = self.require(request_id)
        if status is not None:
            if status not in STATUSES:
                raise RequestError(f"unknown status {status!r}")
            if status != req.status and status not in MOVES[req.status]:
                raise RequestError(f"request {request_id} is {req.status}; it cannot become {status}")
            fields["status"] = status
        tags = {f"esd.{k}": str(v) for k, v in fields.items() if v is not None}
        if status is not None and status != req.status:
            tags |= _event(status, fields.get("reason"))
        if tags:        # one write: the status, its fields and its event land together
            self.client.log_batch(req.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if status in FINAL:
            self.client.set_terminated(req.run_id, RunStatus.to_string(FINAL[status]))
        after = self.require(request_id)
        if status is not None and after.status != status:
            # a concurrent move (a withdrawal) landed between the read and the write: it wins
            raise RequestError(f"request {request_id} moved to {after.status} meanwhile")
        return after


    def start(self, request_id: str, flow_run_id: str | None, runner: str | None = None) -> Request:
        """A run takes the request: running, linked to its flow run and the process running it. A withdrawn
        request is not run."""
        req = self.require(request_id)
        if req.status == "withdrawn":
            raise RequestError(f"request {request_id} was withdrawn")
        return self.update(request_id, "running", flow_run_id=flow_run_id, runner=runner)

    def hold(self, request_id: str, reason: str, actor: str) -> Request:
        """Held for review by an operator: a candidate not promoted yet, or a promoted one that needs another look."""
        return self._decide(request_id, "held", reason, actor)

    def withdraw(self, request_id: str, reason: str, actor: str) -> Request:
        """Withdrawn (or rejected): excluded from the next retrain; the versions already made are kept."""
        return self._decide(request_id, "withdrawn", reason, actor)

    def _decide(self, request_id: str, status: str, reason: str, actor: str) -> Request:
        """An operator's move to STATUS, with who and why; a request already there stays as it is."""
        reason = require_reason(reason)
        req = self.require(request_id)
        if req.status == status:
            return req
        return self.update(request_id, status, reason=f"{actor}: {reason}"[:500])

    def fail(self, request_ids: list[str], exc: BaseException | str) -> None:
        """A run that broke leaves its requests failed with the reason, never stuck in running (a request already
        promoted, held or withdrawn keeps that status)."""
        if isinstance(exc, str):
            reason = exc
        elif any(type(e).__name__ == "TerminationSignal" for e in causes(exc)):
            # Prefect's SIGTERM (a cancellation or a stop), also where a library wrapped it in an error of its own
            # (diffusers' lazy import, interrupted, raises RuntimeError "Failed to import ..." from it)
            reason = "the run was terminated (cancelled, or its worker stopped)"
        elif isinstance(exc, Exception):
            reason = first_line(exc)
        else:       # SystemExit, KeyboardInterrupt: the process was stopped
            reason = f"the run's process was stopped ({type(exc).__name__}{f': {exc}' if str(exc) else ''})"
        for rid in request_ids:
            try:
                req = self.get(rid)
                if req is not None and "failed" in MOVES[req.status]:
                    self.update(rid, "failed", reason=reason[:500])
            except Exception:
                pass

    def retry(self, request_id: str) -> Request:
        """A failed request filed again (received), for a new run."""
        req = self.require(request_id)
        if req.status != "failed":
            raise RequestError(f"request {request_id} is {req.status}; only a failed request can be retried")
        self.client.update_run(req.run_id, status="RUNNING")
        return self.update(request_id, "received", reason="retried", attempt=int(req.attempt or 1) + 1)

    def promoted_with(self, version: int, request_ids: list[str], reason: str | None = None) -> None:
        """The candidate or held requests a version serves become promoted when it becomes production; REASON
        (who and why) is recorded on each."""
        for rid in request_ids:
            req = self.get(rid)
            if req is not None and req.status in ("candidate", "held"):
                self.update(rid, "promoted", model_version=int(version), reason=(reason or "")[:500] or None)

    def active(self, model: str) -> list[Request]:
        """Every request a retrain of MODEL must erase, however many records there are."""
        return [r for status in ACTIVE for r in self.list(status, model, max_results=None)]


EVENT_PREFIX = "esd.event."


def _event(status: str, reason: str | None) -> dict[str, str]:
    """One status change as a run tag of its own (tags are written whole: no read-modify-write race)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {f"{EVENT_PREFIX}{now.strftime('%Y%m%dT%H%M%S%f')}.{status}":
            json.dumps({"status": status, "time": now.isoformat(), "reason": reason})}


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _from_run(run) -> Request:
    t = run.data.tags
    fields = {k.removeprefix("esd."): v for k, v in t.items() if k.startswith("esd.")}
    known = {f for f in Request.__dataclass_fields__}
    req = Request(**{k: v for k, v in fields.items() if k in known and k not in ("run_id", "created")})
    req.run_id, req.created = run.info.run_id, run.info.start_time / 1000 if run.info.start_time else time.time()
    return req
