"""Engine commands: methods, toy build, erase, bench. Errors print one line and exit 1."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from esd import arch_names
from infra.errors import errors_as_one_line, fail, first_line

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Erase concepts from Stable Diffusion models.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(toy_app, name="toy")
app.add_typer(bench_app, name="bench")
console = Console()


class Mode(str, Enum):
    fast = "fast"
    reference = "reference"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def engine_errors() -> tuple[type[BaseException], ...]:
    from esd.delta import DeltaError
    from esd.erase import EraseError
    from esd.evaluate.real import PromptFileError
    from esd.methods import MethodError
    from esd.models import ModelError
    from esd.single_file import SingleFileError

    return EraseError, MethodError, ModelError, DeltaError, PromptFileError, SingleFileError, FileNotFoundError


one_line_errors = errors_as_one_line(engine_errors)


def home() -> Path:
    """ESD_HOME (default ./.esd): where default output folders go."""
    return Path(os.environ.get("ESD_HOME", ".esd"))


@app.command("methods")
@one_line_errors
def methods_cmd(base: Path = typer.Option(None, help="diffusers folder (default: the toy base)"),
                as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """List erasure methods and how many UNet parameters each changes on a base."""
    from esd import methods
    from esd.models import load_pipeline
    from esd.toy import BASE_DIR

    unet = load_pipeline(base or BASE_DIR).unet
    total = sum(p.numel() for p in unet.parameters())
    rows = [{"method": m.name, "kind": m.kind, "parameters": methods.count(unet, m.name),
             "share": methods.count(unet, m.name) / total, "description": m.description}
            for m in methods.METHODS.values()]
    if as_json:
        typer.echo(json.dumps({"unet_parameters": total, "methods": rows}))
        return
    table = Table("method", "kind", "parameters", "share", "changes")
    for r in rows:
        table.add_row(r["method"], r["kind"], f"{r['parameters']:,}", f"{r['share']:.1%}", r["description"])
    console.print(table)


@toy_app.command("build")
@one_line_errors
def toy_build(out: Optional[Path] = typer.Option(None, help="output folder: base/, judge/, build.json "
                                                               "(default: ESD_HOME/toy)"),
              seed: int = typer.Option(0, help="seed of data, weights and order"),
              unet_steps: Optional[int] = typer.Option(None, min=1, help="UNet training steps (default: the build's)"),
              vae_steps: Optional[int] = typer.Option(None, min=1, help="VAE training steps"),
              judge_steps: Optional[int] = typer.Option(None, min=1, help="judge training steps"),
              images_per_combo: Optional[int] = typer.Option(None, min=1, help="rendered images per concept "
                                                                               "combination")):
    """Build the toy base model and its judge from scratch (about an hour on 2 CPU cores)."""
    from esd.toy.build import BuildConfig, build

    cfg = BuildConfig(seed=seed)
    for name, value in dict(unet_steps=unet_steps, vae_steps=vae_steps, judge_steps=judge_steps,
                            images_per_combo=images_per_combo).items():
        if value is not None:
            setattr(cfg, name, value)
    out = out or home() / "toy"
    info = build(out, cfg, log=console.print)
    console.print(f"built in {info['seconds']:.0f}s: {out / 'base'} and {out / 'judge'}")


TinyArch = arch_names.choices("TinyArch", arch_names.TINY)


@toy_app.command("tiny")
@one_line_errors
def toy_tiny(out: Path = typer.Option(..., help="output folder (must not exist)"),
             arch: TinyArch = typer.Option(TinyArch.sd15, help="sd15 (epsilon), sd21-v (SD 2.x layout, v prediction) or sdxl (two text encoders)"),
             seed: int = typer.Option(0, help="seed of the random weights"),
             single_file: bool = typer.Option(False, "--single-file", help="write one .safetensors file in the "
                                                                            "original layout instead of a folder")):
    """A tiny random SD folder (or single file) of a real architecture, in seconds, the same for the same seed (for
    tests and trying the engine: esd base import it, erase it)."""
    import tempfile

    from esd.delta import unet_sha256
    from esd.models import load_pipeline
    from esd.toy import tiny

    if out.exists():
        raise typer.BadParameter(f"{out} already exists", param_hint="--out")
    if not single_file:
        tiny.build(out, arch.value, seed)
        console.print(f"{arch.value} tiny base at {out}: UNet sha256 {unet_sha256(load_pipeline(out).unet)}",
                      soft_wrap=True)
        return
    from esd import single_file as single

    with tempfile.TemporaryDirectory(prefix="esd-tiny-") as tmp:
        folder = tiny.build(Path(tmp) / "model", arch.value, seed)
        sha = single.export(folder, out, arch.value)
        unet = unet_sha256(load_pipeline(folder).unet)
    console.print(f"{arch.value} tiny single-file checkpoint at {out}: sha256 {sha}, UNet sha256 {unet}",
                  soft_wrap=True)


@app.command("erase")
@one_line_errors
def erase_cmd(concepts: list[str] = typer.Argument(..., help="concept(s) to erase, e.g. 'Vela Moreau'"),
              method: str = typer.Option("esd-x", help="a row of `esd methods`"),
              concept_kind: Optional[str] = typer.Option(None, help="style | object | nudity | custom: the kind's "
                                                                    "defaults for the method"),
              iterations: Optional[int] = typer.Option(None, help="ESD: training iterations"),
              lr: Optional[float] = typer.Option(None, help="ESD: learning rate"),
              eta: Optional[float] = typer.Option(None, help="ESD: negative guidance (paper: 1.0; the base may set its own)"),
              ddim_steps: int = typer.Option(50, min=1, help="ESD: DDIM steps of the schedule x_t is drawn from"),
              guidance: float = typer.Option(3.0, help="ESD: guidance while sampling x_t"),
              seed: int = typer.Option(0, help="seed of every random draw"),
              anchor: Optional[str] = typer.Option(None, help="ESD: map the concept onto this one instead of nothing"),
              mode: Mode = typer.Option(Mode.fast, help="ESD loop: fast, or reference (the paper's, step by step)"),
              sample_steps: Optional[int] = typer.Option(None, min=1, help="fast: DDIM jumps to x_t"),
              precision: Precision = typer.Option(Precision.auto, help="ESD: fp32, bf16 autocast, or auto"),
              gradient_checkpointing: bool = typer.Option(False, help="ESD: trade compute for memory"),
              rank: Optional[int] = typer.Option(None, help="ESD: train each weight's change as a product of two "
                                                            "factors of this rank (LoRA); default: every value"),
              template: Optional[list[str]] = typer.Option(None, help="closed-form: a prompt with {concept}; repeat"),
              preserve: Optional[list[str]] = typer.Option(None, help="closed-form: a concept to keep; repeat"),
              guide: Optional[str] = typer.Option(None, help="closed-form: what the concept maps onto (default: nothing)"),
              erase_scale: Optional[float] = typer.Option(None, help="closed-form: weight of the erased prompts"),
              preserve_scale: Optional[float] = typer.Option(None, help="closed-form: weight of the kept prompts"),
              lamb: Optional[float] = typer.Option(None, help="closed-form: pull towards the original weights"),
              push: Optional[float] = typer.Option(None, help="closed-form: push away from the concept (0: none)"),
              rounds: Optional[int] = typer.Option(None, min=0, help="closed-form robust: rounds of recovered prompts"),
              attack_rounds: Optional[int] = typer.Option(None, min=0, help="closed-form: rounds of soft tokens "
                                                                            "learned on the edit and erased too"),
              attack_steps: Optional[int] = typer.Option(None, min=1, help="closed-form: steps of each round's "
                                                                           "textual inversion"),
              base: Path = typer.Option(None, help="diffusers folder or single-file .safetensors checkpoint "
                                                   "(default: the toy base)"),
              arch: Optional[str] = typer.Option(None, help="a single-file base's architecture (sd15, sd21, sd21-v, "
                                                            "sdxl) where the file carries no configs"),
              out: Path = typer.Option(..., help="folder for delta.safetensors + manifest.json")):
    """Erase concepts from a base model and write the delta checkpoint."""
    from esd import delta as delta_lib
    from esd.erase import EraseConfig, erase
    from esd.models import load_pipeline
    from esd.single_file import as_folder
    from esd.toy import BASE_DIR

    kind = {"concept_kind": concept_kind} if concept_kind else {}
    cfg = EraseConfig(list(concepts), method=method, iterations=iterations, lr=lr, eta=eta, ddim_steps=ddim_steps,
                      guidance=guidance, seed=seed, anchor=anchor, mode=mode.value, sample_steps=sample_steps,
                      precision=precision.value, **kind, gradient_checkpointing=gradient_checkpointing, templates=template or None,
                      preserve=preserve or None, guide=guide, erase_scale=erase_scale, preserve_scale=preserve_scale,
                      lamb=lamb, push=push, rounds=rounds, attack_rounds=attack_rounds,
                      attack_steps=attack_steps, rank=rank).validate()
    with as_folder(base or BASE_DIR, arch) as folder:
        pipe = load_pipeline(folder)
        d = erase(pipe, cfg)
    files = delta_lib.save(d, out)
    console.print(f"delta: {d.num_parameters:,} parameters, {d.num_bytes:,} bytes -> {files['tensors'].parent}")


@bench_app.command("quality")
@one_line_errors
def bench_quality(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                  methods: Optional[str] = typer.Option(None, help="comma-separated methods; \"default\": each "
                                                                  "kind's default; none given: every benchmarked method"),
                  concepts: Optional[str] = typer.Option(None, help="comma-separated artists and shapes (default: all)"),
                  attack: bool = typer.Option(True, help="run the recovery attack on every erasure"),
                  stacked: bool = typer.Option(True, help="five default takedowns stacked on one lineage"),
                  reference: bool = typer.Option(True, help="time one reference-mode esd-x erasure"),
                  seeds: str = typer.Option("0", help="comma-separated erasure seeds: each erasure runs at each"),
                  out: Optional[Path] = typer.Option(None, help="before/after grids (default: ESD_HOME/bench)")):
    """The field's protocol on the toy world (held-out prompts): UA, IRA, CRA, attack, time; a table per kind."""
    from esd.bench import quality

    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    try:
        seed_list = [int(s) for s in split(seeds) or []]
    except ValueError:
        fail(f"--seeds takes comma-separated integers, got {seeds!r}")
    out = out or home() / "bench"
    # with --json, stdout carries the one JSON object; the progress bars and lines go to stderr
    log = Console(stderr=True, soft_wrap=True).print if as_json else console.print
    try:
        result = quality(out_dir=out, methods=split(methods), concepts=split(concepts), attack=attack, stacked=stacked,
                         reference=reference, progress=True, cache_dir=home() / "cache" / "judged", log=log,
                         seeds=seed_list)
    except ValueError as exc:
        fail(first_line(exc))
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    b = result["base"]
    console.print(f"base model on its own generations (held-out prompts): shape {b['shape']:.1%}  color "
                  f"{b['color']:.1%}  style {b['style']:.1%}; judge/probe agreement "
                  + ", ".join(f"{k} {v:.1%}" for k, v in result["base_judge_agreement"].items()))
    rows = Table("concept", "method", "seed", "UA", "IRA held-out", "IRA all", "CRA", "look-alike drop", "attack",
                 "judge~probe", "worst drop", "erase s", "eval s")
    for e in result["erasures"]:
        rows.add_row(e["concept"], e["method"], str(e["seed"]), f"{e['ua']:.1%}", f"{e['ira']:.1%}",
                     f"{e['ira_all']:.1%}", f"{e['cra']:.1%}",
                     "-" if e.get("lookalike_drop") is None else f"{e['lookalike_drop']:+.1%}",
                     "-" if e["attack_rate"] is None else f"{e['attack_rate']:.1%}", f"{e['judge_agreement']:.1%}",
                     f"{e['worst_other']} {-e['max_other_drop']:+.1%}", f"{e['erase_seconds']:.1f}",
                     f"{e['eval_seconds']:.0f}")
    console.print(rows)
    for kind in ("style", "object"):
        table = Table("method", "UA", "lowest UA", "IRA (held-out)", "CRA", "attack", "look-alike drop (worst)",
                      "erase s", "concepts", title=f"{kind}: mean over concepts (and erasure seeds "
                      f"{', '.join(map(str, result['seeds']))}), +- standard error")
        for r in (r for r in result["summary"] if r["kind"] == kind):
            table.add_row(r["method"] + (" (default)" if r["default"] else ""),
                          f"{r['ua']:.1%} +- {r['ua_se']:.1%}", f"{r['lowest_ua']:.1%}",
                          f"{r['ira']:.1%} +- {r['ira_se']:.1%}",
                          f"{r['cra']:.1%} +- {r['cra_se']:.1%}",
                          "-" if r["attack_rate"] is None else f"{r['attack_rate']:.1%}",
                          "-" if r["worst_lookalike_drop"] is None else f"{r['worst_lookalike_drop']:+.1%}",
                          f"{r['erase_seconds']:.1f}", str(r["concepts"]))
        for name, row in UNLEARNCANVAS.items():
            ua, ira, cra = (f"{v:.2f}%" for v in row[kind])
            table.add_row(f"UnlearnCanvas {name} (SD 1.5)", ua, "", ira, cra, "", "", f"{row['time']}", "")
        console.print(table)
    if "reference_erase_seconds" in result:
        console.print(f"reference-mode esd-x erasure of one artist, same run: {result['reference_erase_seconds']:.0f}s")
    for st in result.get("stacked_seeds", []):
        low = st["lowest_untouched"]
        plain = st["untouched"].get("plain")
        console.print(f"stacked {' then '.join(st['order'])} (erasure seed {st['seed']}): lowest erased UA "
                      f"{st['min_erased_ua']:.1%} ({st['lowest_erased']}), lowest "
                      f"untouched IRA {st['min_untouched_ira']:.1%} ({low}; the base: "
                      f"{st['untouched'][low]['base_ira']:.1%} of the same {st['untouched'][low]['images']} images), "
                      f"CRA {st['min_untouched_cra']:.1%}"
                      + (f"; no artist named (plain): IRA {plain['ira']:.1%} (the base: {plain['base_ira']:.1%})"
                         if plain else ""))


# Published rows (UnlearnCanvas, Zhang et al. 2024, SD 1.5, 60 styles x 20 objects): UA, IRA, CRA in %, time in s.
UNLEARNCANVAS = {
    "ESD": {"style": (98.58, 80.97, 93.96), "object": (92.15, 55.78, 44.23), "time": 6163},
    "UCE": {"style": (98.40, 60.22, 47.71), "object": (94.31, 39.35, 34.67), "time": 434},
    "SalUn": {"style": (86.26, 90.39, 95.08), "object": (86.91, 96.35, 99.59), "time": 667},
}


@bench_app.command("speed")
@one_line_errors
def bench_speed(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                toy_iterations: int = typer.Option(8, min=1, help="timed iterations on the toy UNet"),
                mid_iterations: int = typer.Option(4, min=1, help="timed iterations on the mid-size UNet"),
                sd15_iterations: int = typer.Option(4, min=1, help="timed iterations on the SD 1.5-size UNet"),
                sdxl_iterations: int = typer.Option(4, min=1, help="timed iterations on the SDXL-size UNet"),
                configs: str = typer.Option("toy,mid", help="comma-separated UNet sizes: toy, mid, sd15, sdxl (SD 1.5's "
                                                            "and SDXL's sizes, for a GPU)"),
                erasure: bool = typer.Option(True, help="also erase in both modes (toy)"),
                sample_steps: Optional[int] = typer.Option(None, min=1, help="fast mode's DDIM jumps to x_t (default: "
                                                                             "the base's, else FAST_SAMPLE_STEPS)"),
                erasure_seeds: int = typer.Option(3, min=1, help="seeds per mode in the erasure check")):
    """Reference vs fast ESD loop: median s/iteration, peak memory, ratios; checkpoint bytes per method."""
    from esd.bench import SPEED_CONFIGS, speed

    chosen = [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in SPEED_CONFIGS]
    if unknown or not chosen:
        fail(f"unknown config {unknown[0] if unknown else configs!r}; choose from: {', '.join(SPEED_CONFIGS)}")
    result = speed(configs=chosen,
                   iterations={"toy": toy_iterations, "mid": mid_iterations, "sd15": sd15_iterations,
                               "sdxl": sdxl_iterations},
                   log=(lambda *a: None) if as_json else console.print, erasure_check=erasure,
                   sample_steps=sample_steps, erasure_seeds=erasure_seeds)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table("config", "method", "reference s/it", "fast s/it", "speed-up", "reference peak", "fast peak",
                  "memory ratio")
    for r in result["runs"]:
        table.add_row(r["config"], r["method"], f"{r['reference_s_per_it']:.3f}", f"{r['fast_s_per_it']:.3f}",
                      f"{r['speedup']:.2f}x", f"{r['reference_peak_bytes'] / 2**20:.0f} MiB",
                      f"{r['fast_peak_bytes'] / 2**20:.0f} MiB", f"{r['memory_ratio']:.2f}")
    console.print(table)
    sizes = Table("config", *result["checkpoint_bytes"]["toy" if "toy" in result["checkpoint_bytes"] else
                              next(iter(result["checkpoint_bytes"]))].keys())
    for config, row in result["checkpoint_bytes"].items():
        sizes.add_row(config, *(f"{v / 2**20:.1f} MiB" for v in row.values()))
    console.print("checkpoint bytes per method (fp32 values, before compression)")
    console.print(sizes)
    e = result.get("erasure")
    if e:
        per_seed = {m: ", ".join(f"{h:.3f}" for h in e[f"{m}_h_scores"]) for m in ("reference", "fast")}
        console.print(f"toy erasure of {e['concept']!r} ({e['method']}, fast with {e['sample_steps']} sample steps, "
                      f"seeds {e['seeds']}): mean H reference {e['reference_h_score']:.3f} ({per_seed['reference']}; "
                      f"{e['reference_erase_seconds']:.0f}s), fast {e['fast_h_score']:.3f} ({per_seed['fast']}; "
                      f"{e['fast_erase_seconds']:.0f}s), difference {e['h_difference']:+.3f}"
                      + (f" (paired standard error {e['h_difference_stderr']:.3f})" if e.get("h_difference_stderr") else ""))


@bench_app.command("speed-run", hidden=True)
@one_line_errors
def bench_speed_run(config: str, method: str, mode: Mode,
                    iterations: int = typer.Option(4, min=1, help="timed iterations"),
                    sample_steps: Optional[int] = typer.Option(None, min=1, help="fast mode's DDIM jumps to x_t")):
    """One speed measurement in this process (used by `esd bench speed`)."""
    from esd.bench import speed_run

    typer.echo(json.dumps(speed_run(config, method, mode.value, iterations, sample_steps=sample_steps), default=str))


def main() -> None:
    app(prog_name="esd")


if __name__ == "__main__":
    sys.exit(main())
