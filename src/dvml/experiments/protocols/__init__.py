"""Written protocols: scripts that choose a default on validation data by a rule stated before any fit, write
their decision, and only then run the test check (reported whatever its sign, never changing the decision)."""
