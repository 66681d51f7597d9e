"""Floor 3: proofs that artifacts compute what the source model computes (parity, precision debug)."""
