"""The static-graph exporter: checkpoint directory -> artifact directory (see docs/ARTIFACT.md)."""

from .writer import export_artifact, export_backbone

__all__ = ["export_artifact", "export_backbone"]
