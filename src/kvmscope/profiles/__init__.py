"""Host profiles shipped with kvmscope (JSON, schema in docs/profiles.md)."""
