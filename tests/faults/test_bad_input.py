"""The bad-input corpus: wrong input at every entry point (the command line, the flows' parameters and settings,
the registry's and the records' functions) gets a one-line error naming the problem, and nothing is written:
the MLflow store (experiments, runs, models, versions, aliases, tags) and the S3 bucket are compared before and
after every case."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from flows.cli import invoke
from tests.conftest import environ
EXISTING = "req-bad-input-existing"


@pytest.fixture(scope="module")
def platform(platform):
    """The shared platform, with one request on file (the cases that refer to an existing request use it)."""
    from flows.requests import Request

    platform.requests.file(Request("circle", "object", "toy-sd", request_id=EXISTING).validate())
    return platform


def snapshot(platform) -> tuple:
    """Everything a case could have written, cheaply compared."""
    client = platform.store.mlflow()
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = [(r.info.run_id, r.info.status, r.info.lifecycle_stage, tuple(sorted(r.data.tags.items())))
            for e in experiments for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL,
                                                            max_results=5000)]
    models = [(m.name, tuple(sorted((m.aliases or {}).items())), tuple(sorted((m.tags or {}).items())))
              for m in client.search_registered_models()]
    versions = [(v.name, v.version, tuple(sorted((v.tags or {}).items()))) for v in client.search_model_versions()]
    s3 = platform.store.s3()
    objects = [(o["Key"], o["Size"]) for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=platform.settings.s3_bucket) for o in page.get("Contents", [])]
    return len(experiments), sorted(runs), sorted(models), sorted(versions), sorted(objects)


@dataclass
class Ran:
    exit_code: int
    output: str


def cli(*args: str):
    """The `esd` command line in this process, as the console script runs it."""
    def run() -> Ran:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = invoke(list(args))
        return Ran(code, out.getvalue())
    return run


def folder_with_symlink(tmp: Path) -> Path:
    from esd.toy import BASE_DIR

    out = tmp / "linked"
    shutil.copytree(BASE_DIR, out)
    target = out / "model_index.json"
    (out / "elsewhere.json").write_text(target.read_text())
    target.unlink()
    target.symlink_to(out / "elsewhere.json")
    return out


def i2p(tmp: Path, text: bytes) -> str:
    path = tmp / f"i2p-{uuid.uuid4().hex[:6]}.csv"
    path.write_bytes(text)
    return str(path)


def env_case(name: str, value: str, fn):
    def run():
        with environ({name: value}):
            return fn()
    return run


def call(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def cases(tmp: Path, platform) -> list[tuple[str, object, str]]:
    """(what, the action, a word the error must contain)."""
    from esd import erase_defaults
    from esd.erase import EraseConfig
    from esd.evaluate.real import read_prompt_csv
    from flows import promotion
    from flows.gate import load_settings
    from flows.requests import Request
    from registry import versions
    from registry.store import manifest_files

    toy = str(Path(__file__).resolve().parents[2] / "esd" / "toy" / "assets" / "base")
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    a_file = tmp / "a-file.txt"
    a_file.write_text("not a model")
    store = platform.store
    good = "circle"

    def req(**kw):
        fields = dict(concept=good, kind="object", model="toy-sd", request_id=f"req-{uuid.uuid4().hex[:8]}") | kw
        return lambda: platform.requests.file(Request(**fields).validate())

    return [
        # --- the command line: requests
        ("submit: empty concept", cli("request", "submit", "", "--kind", "style"), "empty"),
        ("submit: concept over 200 characters", cli("request", "submit", "x" * 201), "200"),
        ("submit: control characters", cli("request", "submit", "circle\x1b[31m", "--kind", "object"), "control"),
        ("submit: newline in concept", cli("request", "submit", "circle\nsquare", "--kind", "object"), "control"),
        ("submit: unknown method", cli("request", "submit", good, "--kind", "object", "--method", "esd-q"), "esd-q"),
        ("submit: unknown kind", cli("request", "submit", good, "--kind", "weather"), "weather"),
        ("submit: unknown base model", cli("request", "submit", good, "--model", "no-such-sd"), "no-such-sd"),
        ("submit: model name with a quote", cli("request", "submit", good, "--model", "toy' or name='x"), "model name"),
        ("submit: model name with a slash", cli("request", "submit", good, "--model", "../toy-sd"), "model name"),
        ("submit: e-mail as requester", cli("request", "submit", good, "--requester", "jane@example.com"), "e-mail"),
        ("submit: requester over 200", cli("request", "submit", good, "--requester", "t" * 201), "200"),
        ("submit: request id with a path", cli("request", "submit", good, "--request-id", "../../etc"), "request id"),
        ("submit: request id over 100", cli("request", "submit", good, "--request-id", "r" * 101), "request id"),
        ("submit: request id with a space", cli("request", "submit", good, "--request-id", "a b"), "request id"),
        ("submit: an id used for another concept", cli("request", "submit", "square", "--kind", "object",
                                                       "--request-id", EXISTING), "already used"),
        ("withdraw: unknown id", cli("request", "withdraw", "no-such-request", "--reason", "x"), "no request"),
        ("withdraw: blank reason", cli("request", "withdraw", EXISTING, "--reason", "  "), "reason"),
        ("retry: unknown id", cli("request", "retry", "no-such-request"), "no request"),
        ("retry: a request that did not fail", cli("request", "retry", EXISTING), "only a failed request"),
        ("show: unknown id", cli("request", "show", "no-such-request"), "no request"),
        ("list: unknown status", cli("request", "list", "--status", "lost"), "lost"),
        # --- the command line: the registry
        ("promote: blank reason", cli("model", "promote", "toy-sd", "1", "--reason", " "), "reason"),
        ("promote: missing version", cli("model", "promote", "toy-sd", "999", "--reason", "x"), "999"),
        ("promote: bad model name", cli("model", "promote", "bad name!", "1", "--reason", "x"), "model name"),
        ("promote: unknown alias", cli("model", "promote", "toy-sd", "1", "--reason", "x", "--alias", "staging"),
         "staging"),
        ("promote: version not a number", cli("model", "promote", "toy-sd", "one", "--reason", "x"), "version"),
        ("rollback: blank reason", cli("model", "rollback", "toy-sd", "--reason", ""), "reason"),
        ("rollback: to a missing version", cli("model", "rollback", "toy-sd", "--to", "999", "--reason", "x"), "999"),
        ("show: missing version", cli("model", "show", "toy-sd", "999"), "999"),
        ("lineage: unknown model", cli("model", "lineage", "no-such-sd", "1"), "no-such-sd"),
        ("history: bad model name", cli("model", "history", "a/b"), "model name"),
        ("list: unknown model", cli("model", "list", "no-such-sd"), "no-such-sd"),
        ("base import: no such folder", cli("base", "import", str(tmp / "nowhere"), "--name", "x-sd"), "not found"),
        ("base import: empty folder", cli("base", "import", str(empty), "--name", "x-sd"), "missing"),
        ("base import: a file", cli("base", "import", str(a_file), "--name", "x-sd"), "not found"),
        ("base import: a symbolic link inside", cli("base", "import", str(folder_with_symlink(tmp)), "--name",
                                                    "linked-sd"), "symbolic link"),
        ("base import: bad name", cli("base", "import", toy, "--name", "toy sd"), "model name"),
        ("base import: a name that has versions", cli("base", "import", toy, "--name", "toy-sd"), "already exists"),
        ("generate: unknown model", cli("generate", "a red circle", "--model", "no-such-sd@production"),
         "no-such-sd"),
        ("generate: zero steps", cli("generate", "a red circle", "--steps", "0"), "steps"),
        # --- the engine's settings, as a flow's parameters carry them
        ("erase settings: iterations over the cap", call(EraseConfig.with_overrides, [good], "esd-x",
                                                         {"iterations": 10**9}), "limit"),
        ("erase settings: zero iterations", call(EraseConfig.with_overrides, [good], "esd-x", {"iterations": 0}),
         "positive"),
        ("erase settings: NaN learning rate", call(EraseConfig.with_overrides, [good], "esd-x",
                                                   {"lr": math.nan}), "lr"),
        ("erase settings: unknown key", call(EraseConfig.with_overrides, [good], "esd-x", {"steps": 3}), "steps"),
        ("erase settings: not a mapping", call(EraseConfig.with_overrides, [good], "esd-x", ["iterations"]),
         "mapping"),
        ("erase settings: unknown method", call(EraseConfig.with_overrides, [good], "esd-z", {}), "esd-z"),
        # --- the gate's settings
        ("gate: NaN threshold", env_case("ESD_GATE_STYLE", '{"max_concept_rate": NaN}', load_settings), "refused"),
        ("gate: threshold below 0", env_case("ESD_GATE_OBJECT", '{"min_preservation": -1}', load_settings),
         "refused"),
        ("gate: threshold above 1", env_case("ESD_GATE_OBJECT", '{"max_concept_rate": 2}', load_settings),
         "refused"),
        ("gate: unknown key", env_case("ESD_GATE_STYLE", '{"max_rate": 0.1}', load_settings), "refused"),
        ("gate: unknown kind", env_case("ESD_GATE_WEATHER", '{}', load_settings), "ESD_GATE_WEATHER"),
        # --- the operator's erase settings
        ("operator erase settings: unknown method", env_case(erase_defaults.ENV, '{"esd-z": {}}', erase_defaults.load),
         "esd-z"),
        ("operator erase settings: a bad value", env_case(erase_defaults.ENV, '{"uce-tokens-adv": {"attack_steps": 0}}',
                                                          erase_defaults.load), "attack_steps"),
        # --- the records and the registry, called directly
        ("file: request id with a slash", req(request_id="a/b"), "request id"),
        ("file: unknown kind", req(kind="colour"), "colour"),
        ("file: model name with a quote", req(model="x'y"), "model name"),
        ("promotion: missing version", call(promotion.promote, platform, "toy-sd", 999, "x", "ops"), "999"),
        ("promotion: blank reason", call(promotion.promote, platform, "toy-sd", 1, "   ", "ops"), "reason"),
        ("resolve: not a reference", call(versions.resolve, store, "toy-sd@@x"), "reference"),
        ("resolve: injection in a name", call(versions.resolve, store, "toy' or '1'='1/1"), "model name"),
        ("register: no delta there", call(versions.register_erased, store, "toy-sd", tmp / "nowhere"), "nowhere"),
        ("manifest: a path out of the version", call(manifest_files, {"files": {"../../etc/passwd": {}}}, "v"),
         "outside"),
        ("manifest: an absolute path", call(manifest_files, {"files": {"/etc/passwd": {}}}, "v"), "outside"),
        # --- prompt files (I2P)
        ("I2P: a seed of inf", call(read_prompt_csv, i2p(tmp, b"prompt,evaluation_seed,evaluation_guidance\n"
                                                          b"a cat,inf,7.5\n")), "seed"),
        ("I2P: not UTF-8", call(read_prompt_csv, i2p(tmp, b"prompt,evaluation_seed,evaluation_guidance\n"
                                                       b"caf\xe9,1,7.5\n")), "UTF-8"),
        ("I2P: missing columns", call(read_prompt_csv, i2p(tmp, b"text,seed\na cat,1\n")), "column"),
    ]


def _one_line(outcome) -> str | None:
    """The error line of a refused case, None if it was not refused cleanly."""
    if hasattr(outcome, "exit_code"):                       # a CliRunner result
        text = (outcome.output or "").strip()
        if outcome.exit_code in (1, 2) and text and "\n" not in text and "Traceback" not in text:
            return text
        return None
    return None                                             # a function that returned: nothing was refused


def test_bad_input_is_refused_in_one_line_and_writes_nothing(platform, tmp_path, ledger):
    corpus = cases(tmp_path, platform)
    problems, refused_cleanly, writes = [], 0, 0
    for what, action, word in corpus:
        before = snapshot(platform)
        try:
            line = _one_line(action())
        except Exception as exc:                            # a function's refusal
            text = str(exc).strip()
            line = text if text and "\n" not in text else None
        wrote = snapshot(platform) != before
        refused = line is not None and word.lower() in line.lower()
        refused_cleanly += refused
        writes += wrote
        if not refused or wrote:
            problems.append(f"{what}: {line!r}{' (wrote)' if wrote else ''}")
    ledger.bad_input(len(corpus), refused_cleanly, writes)
    assert len(corpus) >= 50 and not problems, problems
