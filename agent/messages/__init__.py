"""Command and report models, and the parsers of their wire forms."""
