"""qlower's compiler driver: load, passes, calibration, scale selection, QDQ emission, lowering."""
