"""The takedown or retrain report: a Prefect markdown artifact with the request, the version, the metrics, the
gate's verdict and links to the before/after grids logged on the MLflow run."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.gate import classes_kept
from flows.platform import Platform
from flows.tasks import metrics


def grid_links(tracking_uri: str, run_id: str | None, report: dict) -> dict[str, str]:
    if not run_id:
        return {}
    return {c: f"{tracking_uri}/get-artifact?path={quote('grids/' + Path(p).name)}&run_uuid={run_id}"
            for c, p in (report.get("grids") or {}).items()}


def markdown(title: str, request_ids: list[str], model: str, version: int, report: dict, verdict: dict,
             status: str, links: dict[str, str]) -> str:
    lines = [f"# {title}", "", f"- requests: {', '.join(request_ids)}", f"- model version: `{model}/{version}`",
             f"- status: **{status}**", f"- gate: **{'passed' if verdict['passed'] else 'failed'}**"]
    lines += [f"  - {r}" for r in verdict["reasons"]]
    lines += ["", "| metric | value |", "| --- | --- |"]
    for k, v in metrics(report).items():
        lines.append(f"| {k} | {v:.3f} |")
    for missing in report.get("not_computed", []):
        lines.append(f"| {missing} | not computed |")
    if kept := classes_kept(report):
        head, cls, k = kept[0]
        lines += ["", f"Least kept class: {cls} ({head}), {k['base']:.0%} of its images judged right on the base, "
                      f"{k['candidate']:.0%} on the candidate."]
    for concept, path in (report.get("grids") or {}).items():
        lines += ["", f"## {concept}: before (base) | after (candidate)"]
        if (inline := inline_png(Path(path))) is not None:
            lines.append(f"![{concept}: before and after, one prompt per row]({inline})")
        lines.append(f"local file: `{path}`")
        if concept in links:
            lines.append(f"[the grid on the MLflow run]({links[concept]})")
    return "\n".join(lines)


INLINE_LIMIT = 1_000_000   # bytes of PNG shown inside the report; a bigger grid is linked only


def inline_png(path: Path) -> str | None:
    """The picture as a data: URI, so the report shows it where it is read (the Prefect UI cannot sign in to
    MLflow to fetch a linked image)."""
    import base64

    if not path.is_file() or path.stat().st_size > INLINE_LIMIT:
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def artifact_key(request_ids: list[str], prefix: str = "takedown") -> str:
    key = "-".join([prefix, *request_ids])[:100].lower()
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in key)


@task(cache_policy=NO_CACHE)
def publish_report(title: str, request_ids: list[str], model: str, version: int, report: dict, verdict: dict,
                   status: str, run_id: str | None, prefix: str = "takedown") -> str:
    """A Prefect markdown artifact: request, version, metrics, gate verdict, before/after grids."""
    from prefect.artifacts import create_markdown_artifact

    links = grid_links(Platform().settings.tracking_uri, run_id, report)
    md = markdown(title, request_ids, model, version, report, verdict, status, links)
    create_markdown_artifact(markdown=md, key=artifact_key(request_ids, prefix), description=title)
    return md
