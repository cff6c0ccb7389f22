"""The feature store between stage 1 and stage 2 (Zarr v3, sharded); imports neither stage,
only the shared leaf ``xmei.errors`` (README, "Repository layout")."""
from stores.check import store_info, verify_store
from stores.hdf5 import export_hdf5, import_hdf5
from stores.reader import ClipReader
from stores.store import FAILED, OK, PENDING, FeatureSpec, FeatureStore, StoreError, create_store, unstorable

__all__ = ["FAILED", "OK", "PENDING", "ClipReader", "FeatureSpec", "FeatureStore", "StoreError", "create_store",
           "export_hdf5", "import_hdf5", "store_info", "unstorable", "verify_store"]
