"""PoS-BFL edge agent: the device program (bfl-agent)."""
