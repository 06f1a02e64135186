"""Data sources: raw trees -> Records. ``build_source(cfg.data)`` picks one by ``data.source``."""
from __future__ import annotations


def build_source(data_cfg):
    """The Source for a validated ``DataConfig``. Each reader is imported on demand: this
    ``__init__`` runs whenever config loading imports a ``kdscale.data.sources.*_config`` module,
    which must not pay for every reader."""
    if data_cfg.source == "mimic":
        from kdscale.data.sources.mimic import MimicSource  # on demand (see above)
        return MimicSource(data_cfg.mimic)
    if data_cfg.source == "cbis":
        from kdscale.data.sources.cbis import CbisSource  # on demand (see above)
        return CbisSource(data_cfg.cbis)
    if data_cfg.source == "manifest":
        from kdscale.data.sources.manifest import ManifestSource  # on demand (see above)
        return ManifestSource(data_cfg.manifest)
    if data_cfg.source == "demo":
        from kdscale.data.sources.demo import DemoSource  # on demand (see above)
        return DemoSource(data_cfg.demo)
    if data_cfg.source == "iu_xray":
        from kdscale.data.sources.iu_xray import IuXraySource  # on demand (see above)
        return IuXraySource(data_cfg.iu_xray)
    if data_cfg.source == "webdataset":
        from kdscale.data.sources.webdataset import WebDatasetSource  # on demand (see above)
        return WebDatasetSource(data_cfg.webdataset)
    raise ValueError(f"unknown data.source {data_cfg.source!r}")
