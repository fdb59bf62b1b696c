"""qlower's reference runtime: the integer IR, its file format and a bit-exact executor (numpy only)."""
