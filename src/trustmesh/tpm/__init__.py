"""TPM 2.0: the software TPM for tests, the device driver, and the pure-Python quote verifier."""
