"""Host profiles shipped with pykvm (JSON, schema in docs/profiles.md)."""
