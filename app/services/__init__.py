"""Business rules. Services take a Session, flush but never commit: the request or task scope commits."""
