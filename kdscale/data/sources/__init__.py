"""Data sources: raw trees -> Records. ``build_source(cfg.data)`` picks one by ``data.source``."""
from __future__ import annotations


def build_source(data_cfg):
    """The Source for a validated ``DataConfig`` (imports only the module it needs)."""
    if data_cfg.source == "mimic":
        from kdscale.data.sources.mimic import MimicSource
        return MimicSource(data_cfg.mimic)
    if data_cfg.source == "cbis":
        from kdscale.data.sources.cbis import CbisSource
        return CbisSource(data_cfg.cbis)
    if data_cfg.source == "manifest":
        from kdscale.data.sources.manifest import ManifestSource
        return ManifestSource(data_cfg.manifest)
    if data_cfg.source == "demo":
        from kdscale.data.sources.demo import DemoSource
        return DemoSource(data_cfg.demo)
    if data_cfg.source == "iu_xray":
        from kdscale.data.sources.iu_xray import IuXraySource
        return IuXraySource(data_cfg.iu_xray)
    if data_cfg.source == "webdataset":
        from kdscale.data.sources.webdataset import WebDatasetSource
        return WebDatasetSource(data_cfg.webdataset)
    raise ValueError(f"unknown data.source {data_cfg.source!r}")
