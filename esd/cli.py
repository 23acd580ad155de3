"""Engine commands: methods, toy build, erase, bench. Errors print one line and exit 1."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from esd.errors import first_line  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Erase concepts from Stable Diffusion models.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(toy_app, name="toy")
app.add_typer(bench_app, name="bench")
console = Console()


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _engine_errors() -> tuple[type[BaseException], ...]:
    from esd.delta import DeltaError
    from esd.erase import EraseError
    from esd.evaluate.real import PromptFileError
    from esd.methods import MethodError
    from esd.models import ModelError

    return EraseError, MethodError, ModelError, DeltaError, PromptFileError, FileNotFoundError


def errors_as_one_line(known=lambda: ()):
    """A decorator: the engine's errors, and those `known()` names, become one line on stderr and exit 1."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except _engine_errors() + tuple(known()) as exc:
                fail(first_line(exc))
        return wrapper
    return decorate


one_line_errors = errors_as_one_line()


@app.command("methods")
@one_line_errors
def methods_cmd(base: Path = typer.Option(None, help="diffusers folder (default: the toy base)"),
                as_json: bool = typer.Option(False, "--json")):
    """List erasure methods and how many UNet parameters each trains on a base."""
    from esd import methods
    from esd.models import load_pipeline
    from esd.toy import BASE_DIR

    unet = load_pipeline(base or BASE_DIR).unet
    total = sum(p.numel() for p in unet.parameters())
    rows = [{"method": m.name, "parameters": methods.count(unet, m.name), "share": methods.count(unet, m.name) / total,
             "description": m.description} for m in methods.METHODS.values()]
    if as_json:
        typer.echo(json.dumps({"unet_parameters": total, "methods": rows}))
        return
    table = Table("method", "parameters", "share", "trains")
    for r in rows:
        table.add_row(r["method"], f"{r['parameters']:,}", f"{r['share']:.1%}", r["description"])
    console.print(table)


@toy_app.command("build")
def toy_build(out: Path = typer.Option(Path(".esd/toy"), help="output folder (base/, judge/, build.json)"),
              seed: int = 0, unet_steps: Optional[int] = None, vae_steps: Optional[int] = None,
              judge_steps: Optional[int] = None, images_per_combo: Optional[int] = None):
    """Build the toy base model and its judge from scratch (about 25 minutes on 2 CPU cores)."""
    from esd.toy.build import BuildConfig, build

    cfg = BuildConfig(seed=seed)
    for name, value in dict(unet_steps=unet_steps, vae_steps=vae_steps, judge_steps=judge_steps,
                            images_per_combo=images_per_combo).items():
        if value is not None:
            if value <= 0:
                fail(f"{name.replace('_', '-')} must be > 0")
            setattr(cfg, name, value)
    info = build(out, cfg, log=console.print)
    console.print(f"built in {info['seconds']:.0f}s: {out / 'base'} and {out / 'judge'}")


@app.command("erase")
@one_line_errors
def erase_cmd(concepts: list[str] = typer.Argument(..., help="concept(s) to erase, e.g. 'Vela Moreau'"),
              method: str = "esd-x", iterations: Optional[int] = None, lr: Optional[float] = None,
              eta: Optional[float] = typer.Option(None, help="negative guidance (paper: 1.0; the base may set its own)"),
              ddim_steps: int = 50, guidance: float = 3.0, seed: int = 0, anchor: Optional[str] = None,
              mode: str = "fast", sample_steps: Optional[int] = typer.Option(None, help="fast: DDIM jumps to x_t"),
              precision: str = "auto", gradient_checkpointing: bool = False, base: Path = typer.Option(None, help="diffusers folder (default: the toy base)"),
              out: Path = typer.Option(..., help="folder for delta.safetensors + manifest.json")):
    """Erase concepts from a base model and write the delta checkpoint."""
    from esd import delta as delta_lib
    from esd.erase import EraseConfig, erase
    from esd.models import load_pipeline
    from esd.toy import BASE_DIR

    cfg = EraseConfig(list(concepts), method=method, iterations=iterations, lr=lr, eta=eta, ddim_steps=ddim_steps,
                      guidance=guidance, seed=seed, anchor=anchor, mode=mode, sample_steps=sample_steps,
                      precision=precision, gradient_checkpointing=gradient_checkpointing).validate()
    pipe = load_pipeline(base or BASE_DIR)
    d = erase(pipe, cfg)
    files = delta_lib.save(d, out)
    console.print(f"delta: {d.num_parameters:,} parameters, {d.num_bytes:,} bytes -> {files['tensors'].parent}")


@bench_app.command("quality")
@one_line_errors
def bench_quality(as_json: bool = typer.Option(False, "--json"), out: Path = Path(".esd/bench")):
    """Erase "circle" (esd-u) and "Vela Moreau" (esd-x) from the toy base; judged rates before and after."""
    from esd.bench import quality

    result = quality(out_dir=out, progress=not as_json, log=(lambda *a: None) if as_json else console.print)
    if as_json:
        keep = ("concept", "method", "target_base", "target_erased", "max_other_drop", "worst_other",
                "efficacy", "preservation", "h_score", "attack_success", "ssim_unrelated", "erase_seconds",
                "eval_seconds", "delta_bytes")
        typer.echo(json.dumps({"base": result["base"], "erasures": [{k: e[k] for k in keep} for e in result["erasures"]],
                               "stacked": result.get("stacked")}))
        return
    b = result["base"]
    console.print(f"base model, judged on its own generations: shape {b['shape']:.1%}  color {b['color']:.1%}  "
                  f"style {b['style']:.1%}")
    table = Table("concept", "method", "measure", "base", "erased", "change")
    for e in result["erasures"]:
        table.add_row(e["concept"], e["method"], "target (judged as concept)", f"{e['target_base']:.1%}",
                      f"{e['target_erased']:.1%}", f"{e['target_erased'] - e['target_base']:+.1%}")
        for k, v in e["others"].items():
            table.add_row("", "", k, f"{v['base']:.1%}", f"{v['erased']:.1%}", f"{v['erased'] - v['base']:+.1%}")
        table.add_row("", "", "max drop elsewhere", "", e["worst_other"], f"{-e['max_other_drop']:+.1%}",
                      end_section=True)
    console.print(table)
    summary = Table("concept", "method", "efficacy", "preservation", "SSIM unrelated", "H", "attack success",
                    "erase s", "eval s", "grid")
    for e in result["erasures"]:
        summary.add_row(e["concept"], e["method"], f"{e['efficacy']:.3f}", f"{e['preservation']:.3f}",
                        f"{e['ssim_unrelated']:.3f}", f"{e['h_score']:.3f}", f"{e['attack_success']:.3f}",
                        f"{e['erase_seconds']:.0f}", f"{e['eval_seconds']:.0f}", str(e.get("grid")))
    console.print(summary)
    st = result.get("stacked")
    if st:
        console.print(f"stacked {' then '.join(st['concepts'])}: efficacy {st['efficacy']:.3f}, regression (rate of "
                      f"earlier concepts) {st['regression']}, preservation {st['preservation']:.3f}, H {st['h_score']:.3f}")


@bench_app.command("speed")
def bench_speed(as_json: bool = typer.Option(False, "--json"), toy_iterations: int = 8, mid_iterations: int = 4,
                configs: str = "toy,mid", erasure: bool = typer.Option(True, help="also erase in both modes (toy)"),
                sample_steps: Optional[int] = typer.Option(None, help="fast mode's DDIM jumps to x_t (default: the "
                                                                      "base's, else FAST_SAMPLE_STEPS)"),
                erasure_seeds: int = typer.Option(3, help="seeds per mode in the erasure check")):
    """Reference vs fast ESD loop: median s/iteration, peak memory, ratios; checkpoint bytes per method."""
    from esd.bench import speed

    result = speed(configs=[c.strip() for c in configs.split(",")],
                   iterations={"toy": toy_iterations, "mid": mid_iterations},
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
def bench_speed_run(config: str, method: str, mode: str, iterations: int = 4, sample_steps: Optional[int] = None):
    """One speed measurement in this process (used by `esd bench speed`)."""
    from esd.bench import speed_run

    typer.echo(json.dumps(speed_run(config, method, mode, iterations, sample_steps=sample_steps), default=str))


def main() -> None:
    app(prog_name="esd")


if __name__ == "__main__":
    sys.exit(main())
