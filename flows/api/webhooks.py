"""Webhooks: a requester or an operator registers a URL; every status change of the requests it follows is POSTed
to it, signed, retried with backoff, and never in a flow's way.

The flows do not call anyone: a request's status changes are already recorded as events on its record
(flows.requests). The API process runs one dispatcher thread that reads those events every few seconds, posts each
new one to the subscribers that follow its request, in order, and remembers what each subscriber has received
(in ESD_HOME/webhooks.json, 0600, with the subscribers' secrets). A failed delivery is tried again after 2, 4, 8 ...
seconds, at most MAX_ATTEMPTS times; that request's later events wait for it, everyone else's go on.

    POST <url>   {"event": "request.status", "request_id", "status", "status_text", "time", "reason"}
    X-ESD-Signature: sha256=<HMAC-SHA256 of the body with the subscriber's secret, hex>
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid

from infra.settings import Settings, home_lock, write_private

MAX_ATTEMPTS = 6
POLL_SECONDS = 2.0
log = logging.getLogger("esd.webhooks")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Subscriptions:
    """The subscribers in ESD_HOME/webhooks.json: {id: {url, request_id (None: every request), owner, secret,
    delivered: {request_id: events delivered}}}."""

    def __init__(self, settings: Settings):
        self.settings, self.path = settings, settings.home / "webhooks.json"

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def add(self, url: str, request_id: str | None, owner: str) -> tuple[str, str]:
        """A new subscriber; returns its id and secret (shown once)."""
        sid, secret = "wh-" + uuid.uuid4().hex[:12], secrets.token_urlsafe(32)
        with home_lock(self.settings.home, "webhooks"):
            subs = self.read()
            subs[sid] = {"url": url, "request_id": request_id, "owner": owner, "secret": secret, "delivered": {},
                         "created": time.time()}
            write_private(self.path, json.dumps(subs))
        return sid, secret

    def remove(self, sid: str) -> dict | None:
        with home_lock(self.settings.home, "webhooks"):
            subs = self.read()
            gone = subs.pop(sid, None)
            write_private(self.path, json.dumps(subs))
        return gone

    def delivered(self, sid: str, request_id: str, count: int) -> None:
        with home_lock(self.settings.home, "webhooks"):
            subs = self.read()
            if sid in subs:
                subs[sid]["delivered"][request_id] = max(count, subs[sid]["delivered"].get(request_id, 0))
                write_private(self.path, json.dumps(subs))


class Dispatcher:
    """The thread that turns new status events into signed POSTs."""

    def __init__(self, settings: Settings, platform_of, words: dict[str, str]):
        self.subs, self.platform_of, self.words = Subscriptions(settings), platform_of, words
        self.pending: dict[tuple[str, str, int], dict] = {}      # (sid, request, event index) -> attempt state
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="esd-webhooks", daemon=True)

    def start(self) -> "Dispatcher":
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            try:
                self.tick()
            except Exception as exc:        # the next tick tries again; a dispatcher never dies of one bad read
                log.warning(f"webhooks: {type(exc).__name__}: {exc}")

    def tick(self, now: float | None = None) -> None:
        """Queue every event a subscriber has not received, then post what is due."""
        now = time.monotonic() if now is None else now
        subs = self.subs.read()
        if not subs:
            return
        requests = self.platform_of().requests
        every = None
        for sid, sub in subs.items():
            if sub["request_id"]:
                followed = [sub["request_id"]]
            else:
                every = every if every is not None else [r.request_id for r in requests.list(max_results=200)]
                followed = every
            for rid in followed:
                history = requests.history(rid)
                for i in range(sub["delivered"].get(rid, 0), len(history)):
                    self.pending.setdefault((sid, rid, i), {"attempts": 0, "due": now, "event": history[i]})
        waiting = set()             # (subscriber, request) with an earlier event not delivered yet: in order
        for (sid, rid, i), item in sorted(self.pending.items(), key=lambda kv: kv[0]):
            if sid not in subs:                      # removed meanwhile
                del self.pending[(sid, rid, i)]
                continue
            if item["due"] > now or (sid, rid) in waiting:
                waiting.add((sid, rid))
                continue
            if self._post(subs[sid], rid, item["event"]):
                del self.pending[(sid, rid, i)]
                self.subs.delivered(sid, rid, i + 1)
            else:
                item["attempts"] += 1
                if item["attempts"] >= MAX_ATTEMPTS:
                    log.warning(f"webhooks: giving up on {subs[sid]['url']} for {rid} event {i}")
                    del self.pending[(sid, rid, i)]
                    self.subs.delivered(sid, rid, i + 1)
                else:
                    item["due"] = now + 2 ** item["attempts"]
                    waiting.add((sid, rid))

    def _post(self, sub: dict, rid: str, event: dict) -> bool:
        import httpx

        body = json.dumps({"event": "request.status", "request_id": rid, "status": event["status"],
                           "status_text": self.words.get(event["status"], event["status"]), "time": event["time"],
                           "reason": event.get("reason")}, sort_keys=True).encode()
        try:
            r = httpx.post(sub["url"], content=body, timeout=5, follow_redirects=False,
                           headers={"Content-Type": "application/json", "X-ESD-Signature": sign(sub["secret"], body)})
            return 200 <= r.status_code < 300
        except httpx.HTTPError:
            return False
