"""Small shared utilities: atomic file writes, metrics logging, seeding, progress."""
