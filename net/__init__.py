"""Network clients: the hostile-host guard, per-host rate limits, the PDS client and identity
resolution (PLC / did:web)."""
