"""Versions in MLflow (runs, model registry, aliases), weights in S3; thin over MlflowClient and boto3."""

from registry.aliases import ALIASES, history, previous_production, promote, rollback
from registry.load import load
from registry.sizes import SD1_UNET, method_fraction
from registry.store import IntegrityError, RegistryError, Store
from registry.versions import import_base, lineage, list_versions, register_erased, resolve, show, verify

__all__ = ["ALIASES", "SD1_UNET", "IntegrityError", "RegistryError", "Store", "history", "import_base", "lineage",
           "list_versions", "load", "method_fraction", "previous_production", "promote", "register_erased",
           "resolve", "rollback", "show", "verify"]
