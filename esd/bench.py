"""Benchmarks: `esd bench quality` (erasure on the toy world, judged)."""

from __future__ import annotations

import time
from pathlib import Path

from esd.erase import EraseConfig, erase
from esd.evaluate import toy as toy_eval
from esd.models import load_pipeline
from esd.toy import BASE_DIR, JUDGE_DIR
from esd.toy.judge import Judge

QUALITY_ERASURES = [("circle", "esd-u"), ("Vela Moreau", "esd-x")]


def quality(base_dir: Path = BASE_DIR, judge_dir: Path = JUDGE_DIR, out_dir: Path | None = None,
            erasures=QUALITY_ERASURES, overrides: dict | None = None, progress: bool = True, log=print,
            stacked: bool = True) -> dict:
    """Judge the base, run each erasure at default settings, evaluate it (report + per-concept table); then the
    second erasure stacked on the first, to measure regression."""
    from esd.evaluate import report as report_lib

    judge = Judge.load(judge_dir)
    t0 = time.time()
    base = toy_eval.judge_model(load_pipeline(base_dir), judge, progress=progress)
    log(f"base judged in {time.time() - t0:.0f}s")
    result = {"base": toy_eval.base_summary(base), "erasures": []}
    deltas = {}
    for concept, method in erasures:
        pipe = load_pipeline(base_dir)
        t0 = time.time()
        delta = erase(pipe, EraseConfig([concept], method=method, **(overrides or {})), progress=progress)
        erase_s = time.time() - t0
        t0 = time.time()
        erased = toy_eval.judge_model(pipe, judge, progress=progress)
        report = report_lib.build_report(base, erased, pipe, judge, [concept], [], report_lib.EvalConfig(),
                                         out_dir, t0)
        row = toy_eval.compare(base, erased, concept)
        row.update(method=method, erase_seconds=erase_s, delta_bytes=delta.num_bytes,
                   hyperparameters=delta.manifest["hyperparameters"],
                   **{k: report[k] for k in ("efficacy", "preservation", "h_score", "attack_success", "ssim_unrelated",
                                             "eval_seconds")},
                   grid=(report.get("grids") or {}).get(concept))
        result["erasures"].append(row)
        deltas[concept] = delta
        log(f"{concept} ({method}): erased in {erase_s:.0f}s, evaluated in {report['eval_seconds']:.0f}s")
    if stacked and len(erasures) >= 2:
        # Regression: the second erasure stacked on the first; the first concept must stay erased.
        (first, _), (second, method) = erasures[0], erasures[1]
        pipe = load_pipeline(base_dir)
        erase(pipe, EraseConfig([second], method=method, **(overrides or {})), parent=deltas[first], progress=progress)
        t0 = time.time()
        report = report_lib.evaluate(base, pipe, judge, [second], [first], report_lib.EvalConfig(attack=False))
        result["stacked"] = {"concepts": [first, second], "efficacy": report["efficacy"],
                             "regression": {c: r["rate"] for c, r in report["regression"].items()},
                             "preservation": report["preservation"], "h_score": report["h_score"],
                             "eval_seconds": report["eval_seconds"]}
    return result


# ---- speed: reference vs fast ESD loop ----------------------------------------------------------------------

SPEED_CONFIGS = ("toy", "mid")
SPEED_METHODS = ("esd-x", "esd-u")


def speed_pipe(config: str):
    """The toy base, or `mid`: an SD 1.x-shaped UNet with random weights (speed does not depend on weights)."""
    if config == "toy":
        return load_pipeline(BASE_DIR)
    if config != "mid":
        raise ValueError(f"unknown speed config {config!r}; choose toy or mid")
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from esd.toy.build import SCHEDULE

    toy = load_pipeline(BASE_DIR)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    # A one-layer text encoder: only its 77x768 embeddings matter to the UNet loop.
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(toy.tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=toy.tokenizer.bos_token_id, eos_token_id=toy.tokenizer.eos_token_id,
                                        pad_token_id=toy.tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=toy.vae, text_encoder=text, tokenizer=toy.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULE), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def speed_run(config: str, method: str, mode: str, iterations: int, seed: int = 0,
              sample_steps: int | None = None) -> dict:
    """One measurement, meant for a fresh process: median s/iteration after one warm-up, and peak memory."""
    import resource
    import statistics

    import torch

    from esd.erase import EraseConfig, Eraser

    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = _rss_bytes()
    pipe = speed_pipe(config).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eraser = Eraser(pipe, EraseConfig(["Vela Moreau"], method=method, mode=mode, iterations=iterations + 1, seed=seed,
                                      sample_steps=sample_steps))
    times = []
    for _ in range(iterations + 1):
        t0 = time.perf_counter()
        eraser.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"config": config, "method": method, "mode": mode, "s_per_it": statistics.median(times[1:]),
            "peak_bytes": peak, "device": device, "precision": eraser.autocast.fast_dtype if eraser.autocast._enabled
            else "fp32", "sample_steps": eraser.cfg.sample_steps}


def speed(configs=SPEED_CONFIGS, methods=SPEED_METHODS, iterations: dict | None = None, log=print,
          erasure_check: bool = True, sample_steps: int | None = None, erasure_seeds: int = 3) -> dict:
    """Reference and fast on the same UNet config, each in its own process so peak memory is its own."""
    import json
    import subprocess
    import sys

    from esd import methods as methods_lib

    iterations = iterations or {"toy": 8, "mid": 4}
    runs, checkpoint_bytes = [], {}
    for config in configs:
        unet = speed_pipe(config).unet
        checkpoint_bytes[config] = {m: methods_lib.count(unet, m) * 4 for m in methods_lib.METHODS}
        checkpoint_bytes[config]["full_unet"] = sum(p.numel() for p in unet.parameters()) * 4
        del unet
        for method in methods:
            row = {"config": config, "method": method}
            for mode in ("reference", "fast"):
                extra = ["--sample-steps", str(sample_steps)] if sample_steps and mode == "fast" else []
                out = subprocess.run([sys.executable, "-m", "esd.cli", "bench", "speed-run", config, method, mode,
                                      "--iterations", str(iterations[config]), *extra], capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"speed run {config}/{method}/{mode} failed: {out.stderr.strip()[-500:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                row[f"{mode}_s_per_it"], row[f"{mode}_peak_bytes"] = r["s_per_it"], r["peak_bytes"]
                row["device"], row[f"{mode}_precision"] = r["device"], str(r["precision"])
                if mode == "fast":
                    row["fast_sample_steps"] = r["sample_steps"]
                log(f"{config} {method} {mode}: {r['s_per_it']:.3f} s/it, peak {r['peak_bytes'] / 2**20:.0f} MiB")
            row["speedup"] = row["reference_s_per_it"] / row["fast_s_per_it"]
            row["memory_ratio"] = row["fast_peak_bytes"] / row["reference_peak_bytes"]
            runs.append(row)
    result = {"runs": runs, "checkpoint_bytes": checkpoint_bytes}
    if erasure_check:
        result["erasure"] = same_erasure("Vela Moreau", "esd-x", log, sample_steps, tuple(range(erasure_seeds)))
    return result


def same_erasure(concept: str, method: str, log=print, sample_steps: int | None = None,
                 seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """The toy erasure at default settings in both modes (fast with `sample_steps` DDIM jumps when given), judged,
    over several seeds: fast should match reference's mean H score. One seed alone says little: the judged rate
    of one erasure moves by 10-20 points with the seed."""
    import statistics

    from esd.evaluate import report as report_lib

    judge = Judge.load(JUDGE_DIR)
    base = toy_eval.judge_model(load_pipeline(BASE_DIR), judge)
    out = {"concept": concept, "method": method, "seeds": list(seeds)}
    for mode in ("reference", "fast"):
        h, rate, seconds = [], [], []
        for seed in seeds:
            pipe = load_pipeline(BASE_DIR)
            t0 = time.time()
            cfg = EraseConfig([concept], method=method, mode=mode, seed=seed,
                              sample_steps=sample_steps if mode == "fast" else None)
            delta = erase(pipe, cfg, progress=False)
            seconds.append(time.time() - t0)
            if mode == "fast":
                out["sample_steps"] = delta.manifest["hyperparameters"]["sample_steps"]
            report = report_lib.evaluate(base, pipe, judge, [concept], [], report_lib.EvalConfig(attack=False))
            h.append(report["h_score"])
            rate.append(report["per_concept"][concept]["rate"])
            log(f"toy {concept} {method} {mode} seed {seed}: H {h[-1]:.3f}, rate {rate[-1]:.3f}, "
                f"erase {seconds[-1]:.0f}s")
        out.update({f"{mode}_h_scores": h, f"{mode}_rates": rate, f"{mode}_h_score": statistics.mean(h),
                    f"{mode}_rate": statistics.mean(rate), f"{mode}_erase_seconds": statistics.median(seconds)})
    # Seeds pair the runs (same concept draws, stop steps and starting noise), so the paired differences
    # carry less of the seed-to-seed spread than the two means do.
    pairs = [f - r for f, r in zip(out["fast_h_scores"], out["reference_h_scores"])]
    out["h_difference"] = out["fast_h_score"] - out["reference_h_score"]
    out["h_difference_stderr"] = statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else None
    return out
