"""Versions in MLflow (runs, model registry, aliases), weights in S3; thin over MlflowClient and boto3.

Names are imported on first use, so `import registry` (and `esd --help`) does not load torch or MLflow. Loading a
version as a pipeline is `registry.load.load`.
"""

from importlib import import_module

_HOMES = {"ALIASES": "aliases", "history": "aliases", "previous_production": "aliases", "promote": "aliases",
          "rollback": "aliases", "SD1_UNET": "sizes", "method_fraction": "sizes",
          "IntegrityError": "store", "RegistryError": "store", "Store": "store", "import_base": "versions",
          "lineage": "versions", "list_versions": "versions", "record_gate": "versions",
          "register_erased": "versions", "resolve": "versions", "show": "versions", "verify": "versions"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    return getattr(import_module(f"registry.{_HOMES[name]}"), name)
