"""The two web pages the API serves, server-rendered with Jinja2: no scripts, no build step, no external assets.

    /opt-out                       the form an artist fills in; it files a request as POST /v1/requests does
    /opt-out/requests/{id}?token=  that request's status in plain words, refreshing itself until it ends
    /review                        operators: the queue of candidate and held requests (after /review/sign-in)
    /review/requests/{id}          one request: its labelled before/after grids, figures, the gate's verdict and
                                   reason, lineage, and promote / hold / rollback, each asking for a reason

Both call the same Desk as the JSON endpoints (flows.api.app), so a page does exactly what the API does (in a
worker thread, as FastAPI runs the synchronous JSON endpoints: the platform's clients are synchronous). An
operator signs in once with their credential, kept in an HttpOnly, SameSite=Strict cookie scoped to /review; every
form that acts also carries a token derived from that credential (no other site can post one).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from pydantic import ValidationError

from flows.gate import classes_kept

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
COOKIE = "esd_review"
KINDS = [("style", "An artist's style"), ("object", "A subject or object"), ("nudity", "Nudity"),
         ("custom", "Something else")]
# What each status means to the person who asked, and the steps a request goes through.
STEPS = [("received", "Received"), ("running", "Removing it from the model and checking the result"),
         ("candidate", "Checked; waiting for a decision"), ("promoted", "Done: the model no longer produces it")]
HEADLINES = {"received": ("We have your request.", "It starts within a minute or two."),
             "running": ("We are removing it from the model.", "Then we check that it is gone and that the "
                                                               "model still works for everything else."),
             "candidate": ("The new model is ready.", "We decide within a few minutes whether it goes live."),
             "promoted": ("Done.", "The model we serve no longer produces it."),
             "held": ("A person is reviewing your request.", "The automatic checks were not conclusive; an "
                                                             "operator looks at the results and decides."),
             "failed": ("Something went wrong on our side.", "An operator has been told and will retry it."),
             "withdrawn": ("This request was withdrawn.", "")}
REFRESH = 5
# The JSON body's field names -> the form's, for errors shown beside the field
FORM_FIELDS = {"name": "name", "contact": "contact", "concept": "concept", "kind": "kind", "urls": "evidence_urls",
               "text": "evidence_text"}


def add(app: FastAPI, desk) -> None:
    from flows.api.app import NewRequest, PLAIN_WORDS

    def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)

    def message(request: Request, code: int, title: str, text: str, area: str, link: str = "", link_text: str = ""):
        return render(request, "message.html", code, title=title, message=text, area=area, link=link,
                      link_text=link_text)

    async def form_of(request: Request) -> dict[str, str]:
        data = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0].strip() for k, v in data.items()}

    # --- the opt-out page ------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/opt-out", 303)

    @app.get("/opt-out", response_class=HTMLResponse, include_in_schema=False)
    def opt_out_form(request: Request):
        return render(request, "opt_out.html", title="Opt out", area="Opt out", kinds=KINDS, values={}, errors={},
                      form_id=str(uuid.uuid4()))

    @app.post("/opt-out", response_class=HTMLResponse, include_in_schema=False)
    async def opt_out_send(request: Request):
        values = await form_of(request)
        errors: dict[str, str] = {}
        urls = [u.strip() for u in values.get("evidence_urls", "").splitlines() if u.strip()]
        body = None
        try:
            body = NewRequest(concept=values.get("concept", ""), kind=values.get("kind", ""),
                              requester={"name": values.get("name", ""), "contact": values.get("contact", "")},
                              evidence={"urls": urls, "text": values.get("evidence_text", "")},
                              consent_to_contact=bool(values.get("consent")))
        except ValidationError as exc:
            for e in exc.errors():
                where = next((FORM_FIELDS[str(x)] for x in reversed(e["loc"]) if str(x) in FORM_FIELDS), "form")
                errors.setdefault(where, _plain(e))
        if not values.get("consent"):
            errors["consent"] = "Please agree that we may contact you about this request, so we can ask about it."
        if body is not None and not errors:
            try:
                rid, token = await run_in_threadpool(desk.file, body, values.get("form_id") or None, None)
                return RedirectResponse(f"/opt-out/requests/{rid}?token={quote(token)}", 303)
            except HTTPException as exc:
                errors["concept" if exc.status_code == 422 else "form"] = str(exc.detail)
        return render(request, "opt_out.html", 422 if "form" not in errors else 429, title="Opt out: check the form",
                      area="Opt out", kinds=KINDS, values=values, errors=errors,
                      form_id=values.get("form_id") or str(uuid.uuid4()))

    @app.get("/opt-out/requests/{request_id}", response_class=HTMLResponse, include_in_schema=False)
    def opt_out_status(request: Request, request_id: str, token: str = ""):
        if not desk.may_read(request_id, token, None):
            return message(request, 401, "This status page needs its key",
                           "Open the address you were given when you sent the request; it carries its key.",
                           "Opt out", "/opt-out", "Send a new request")
        try:
            status = desk.status(request_id)
        except HTTPException:
            return message(request, 404, "No such request", f"There is no request {request_id}.", "Opt out")
        steps = _steps(status.status)
        final = status.status in ("promoted", "held", "failed", "withdrawn")
        headline, explanation = HEADLINES.get(status.status, (status.status_text, ""))
        return render(request, "status.html", title=f"Request: {status.concept}", area="Opt out", status=status,
                      steps=steps, headline=headline, explanation=explanation, words=PLAIN_WORDS,
                      refresh=None if final else REFRESH)

    # --- the review desk --------------------------------------------------------------------------------------

    def csrf_of(token: str) -> str:
        key = desk.settings.generated("api_token_key").encode()
        return hmac.new(key, f"csrf:{token}".encode(), hashlib.sha256).hexdigest()[:32]

    def operator(request: Request):
        """The signed-in operator, or None."""
        token = request.cookies.get(COOKIE, "")
        try:
            user = desk.user(token)
        except HTTPException:
            return None
        return user if user is not None and user.role == "operator" else None

    def signed_out(request: Request):
        return RedirectResponse("/review/sign-in", 303)

    @app.get("/review/sign-in", response_class=HTMLResponse, include_in_schema=False)
    def sign_in_form(request: Request):
        return render(request, "sign_in.html", title="Sign in", area="Review", errors={})

    @app.post("/review/sign-in", response_class=HTMLResponse, include_in_schema=False)
    async def sign_in(request: Request):
        token = (await form_of(request)).get("credential", "")
        try:
            user = desk.require(desk.user(token), "operator", what="the review desk")
        except HTTPException as exc:
            why = "Enter your credential." if not token else (
                "That credential is not valid." if exc.status_code == 401 else str(exc.detail))
            return render(request, "sign_in.html", exc.status_code, title="Sign in", area="Review",
                          errors={"credential": why})
        response = RedirectResponse("/review", 303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/review", max_age=8 * 3600)
        return response

    @app.post("/review/sign-out", include_in_schema=False)
    async def sign_out(request: Request):
        response = RedirectResponse("/review/sign-in", 303)
        response.delete_cookie(COOKIE, path="/review")
        return response

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    def queue(request: Request):
        user = operator(request)
        if user is None:
            return signed_out(request)
        groups = [("Held for review", desk.list(user, "held")), ("Candidates", desk.list(user, "candidate")),
                  ("Failed", desk.list(user, "failed")), ("Recently promoted", desk.list(user, "promoted", limit=20))]
        return render(request, "queue.html", title="Review queue", area="Review", user=user, groups=groups,
                      csrf=csrf_of(request.cookies[COOKIE]))

    def review_page(request: Request, user, request_id: str, status_code: int = 200, errors=None, values=None,
                    done: str = ""):
        try:
            ev = desk.evidence(request_id)
        except HTTPException as exc:
            return message(request, exc.status_code, "Not found", str(exc.detail), "Review", "/review", "Back")
        r = ev["request"]
        grids = [{"title": name.removesuffix(".png").replace("-before-after", "").replace("-", " "),
                  "src": f"/review/requests/{request_id}/grids/{quote(name)}"} for name in ev["grids"]]
        return render(request, "review.html", status_code, title=f"Review: {r.concept}", area="Review", user=user,
                      r=r, figures=_figures(ev["evaluation"], r.concept), grids=grids, lineage=ev["lineage"],
                      errors=errors or {}, values=values or {}, done=done, csrf=csrf_of(request.cookies[COOKIE]))

    @app.get("/review/requests/{request_id}", response_class=HTMLResponse, include_in_schema=False)
    def review(request: Request, request_id: str, done: str = ""):
        user = operator(request)
        if user is None:
            return signed_out(request)
        return review_page(request, user, request_id, done=done)

    @app.get("/review/requests/{request_id}/grids/{name}", include_in_schema=False)
    def grid(request: Request, request_id: str, name: str):
        if operator(request) is None:
            return Response(status_code=401)
        try:
            return Response(desk.grid(request_id, name), media_type="image/png")
        except HTTPException as exc:
            return Response(status_code=exc.status_code)

    async def decide(request: Request, request_id: str, action: str, act):
        user = operator(request)
        if user is None:
            return message(request, 401, "Signed out", "Sign in again to decide.", "Review", "/review/sign-in",
                           "Sign in")
        values = await form_of(request)
        if not hmac.compare_digest(values.get("csrf", ""), csrf_of(request.cookies[COOKIE])):
            return message(request, 403, "Refused", "This form did not come from the review desk.", "Review",
                           "/review", "Back to the queue")
        reason = values.get(f"{action}-reason", "")
        if not reason:
            return review_page(request, user, request_id, 422, {f"{action}-reason": "Give a reason: it is recorded."},
                               values)
        try:
            done = await run_in_threadpool(act, user, reason, values)
        except HTTPException as exc:
            return review_page(request, user, request_id, exc.status_code, {"form": str(exc.detail)}, values)
        return RedirectResponse(f"/review/requests/{request_id}?done={quote(done)}", 303)

    @app.post("/review/requests/{request_id}/promote", include_in_schema=False)
    async def promote(request: Request, request_id: str):
        def act(user, reason, values):
            event = desk.promote(request_id, reason, bool(values.get("force")), user)
            return f"Promoted: production is v{event['to']}."
        return await decide(request, request_id, "promote", act)

    @app.post("/review/requests/{request_id}/hold", include_in_schema=False)
    async def hold(request: Request, request_id: str):
        return await decide(request, request_id, "hold",
                            lambda user, reason, values: (desk.hold(request_id, reason, user), "Held for review.")[1])

    @app.post("/review/models/{name}/rollback", include_in_schema=False)
    async def rollback(request: Request, name: str):
        rid = request.query_params.get("request", "")

        def act(user, reason, values):
            to = values.get("rollback-to") or None
            if to is not None and not to.isdigit():
                raise HTTPException(422, "the version to roll back to is a number")
            event = desk.rollback(name, reason, int(to) if to else None, user)
            return f"Production of {name} rolled back from v{event['from']} to v{event['to']}."
        return await decide(request, rid, "rollback", act)


def _steps(status: str) -> list[dict]:
    """The steps of STEPS with their state for a request in STATUS: done, current, or not reached ("")."""
    order = [s for s, _ in STEPS]
    if status == "promoted":
        return [{"text": text, "state": "done"} for _, text in STEPS]
    if status == "held":
        return [{"text": text, "state": "done"} for _, text in STEPS[:-1]] + \
            [{"text": "Under review by a person", "state": "current"}]
    at = order.index(status) if status in order else -1     # failed, withdrawn: no step is current
    return [{"text": text, "state": "done" if i < at else ("current" if i == at else "")}
            for i, (_, text) in enumerate(STEPS)]


def _plain(error: dict) -> str:
    """A validation error in plain words."""
    text = error.get("msg", "is not valid").removeprefix("Value error, ")
    if error.get("type") == "missing" or (error.get("type") == "string_too_short" and not error.get("input")):
        return "This field is required."
    if error.get("type") == "literal_error":
        return "Choose one of the options."
    return text[0].upper() + text[1:] if text else "Not valid."


def _figures(evaluation: dict | None, concept: str) -> list[tuple[str, str, str]]:
    """The evaluation's figures as the review page lists them: (name, value, what it means)."""
    if not evaluation:
        return []
    pct = lambda v: "not computed" if v is None else f"{100 * v:.1f}%"
    rows = [("UA (erased)", pct(evaluation.get("efficacy")),
             f"share of {concept}'s images no longer judged as {concept}")]
    head = _head_of(concept)
    acc = evaluation.get("accuracy_unrelated") or {}
    for h, v in acc.items():
        name = f"IRA ({h})" if h == head else f"CRA ({h})"
        what = "other classes of the same judge head" if h == head else "another judge head"
        rows.append((name, f"{pct(v.get('base'))} → {pct(v.get('candidate'))}",
                     f"accuracy on prompts not naming {concept}, {what} (base → candidate)"))
    rows.append(("preservation", pct(evaluation.get("preservation")), "everything else, candidate against base"))
    kept = classes_kept(evaluation)
    if kept:
        head, cls, k = kept[0]
        rows.append(("least kept class", f"{cls} ({head}): {pct(k['base'])} → {pct(k['candidate'])}",
                     "the artist, shape or color whose images changed most (base → candidate)"))
    rows += [("attack", pct(evaluation.get("attack_success")), "images the recovery attack brings back"),
             ("H score", f"{evaluation.get('h_score', 0):.3f}", "harmonic mean of erasure and preservation")]
    for c, e in (evaluation.get("regression") or {}).items():
        rows.append((f"still erased: {c}", pct(e.get("rate")), "an earlier erasure in this lineage (lower is better)"))
    return rows


def _head_of(concept: str) -> str | None:
    from esd.evaluate import toy as toy_eval

    found = toy_eval.concept_attribute(concept)
    return found[0] if found else None
