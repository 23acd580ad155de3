"""MLflow models-from-code entry point of every registered version (no pickle).

`mlflow.pyfunc.load_model("models:/toy-sd@production").predict(["a red circle"])` returns uint8 images
(N, H, W, 3), and `mlflow models serve -m models:/toy-sd@production --env-manager local` serves them.
MLflow copies this file into each version's model directory and executes it from there when loading, so the
version's esd-version.json and weights/ lie beside it; an erased version fetches its base through the
tracking server (verified, cached by sha256). Before reading any weights, load_context checks the whole directory
(this file, MLmodel, requirements, weights) against the manifest whose sha256 a registered version's tag names.
MLflow has already run this file by then: `registry.load.pyfunc` checks the directory before MLflow reads it.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

MODEL_DIR = Path(__file__).resolve().parent


class StableDiffusionVersion(PythonModel):
    # predict takes prompts and params (seed, steps, guidance) with no type hints, on purpose: MLflow would derive
    # the signature from them and drop the params of the explicit one. This tells MLflow not to look for hints
    # (and not to warn about their absence on every import).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from registry.load import default_cache_dir, pipeline_from_dir

        self.pipe = pipeline_from_dir(MODEL_DIR, mlflow.get_tracking_uri(), default_cache_dir())

    def predict(self, context, model_input, params=None):
        """Prompts -> uint8 images (N, H, W, 3); params: seed (image i uses seed + i), num_inference_steps,
        guidance_scale."""
        from esd import sample

        # MLflow hands the signature's one string column over as a DataFrame; a list or str also works.
        if hasattr(model_input, "iloc"):
            prompts = [str(p) for p in model_input.iloc[:, 0]]
        else:
            prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        p = params or {}
        seed = int(p.get("seed", 0))
        images = sample.generate(self.pipe, prompts, [seed + i for i in range(len(prompts))],
                                 steps=int(p.get("num_inference_steps", 25)),
                                 guidance=float(p.get("guidance_scale", sample.DEFAULT_GUIDANCE)))
        return sample.to_uint8(images)


mlflow.models.set_model(StableDiffusionVersion())
