"""edge-upgrade-agent: upgrades KubeEdge edge nodes safely."""

__version__ = "0.1.0"
