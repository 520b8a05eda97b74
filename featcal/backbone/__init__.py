"""Backbone adapters (model families). See ``featcal.backbone.base.Backbone``."""
from featcal.backbone.base import Backbone, BlockState

__all__ = ["Backbone", "BlockState"]
