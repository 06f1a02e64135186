"""Input/output pieces that know no stage: atomic, durable file writes (``atomic``)."""
