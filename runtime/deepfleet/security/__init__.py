"""Weights at rest: SHA256 manifests (verified before load) and AES-256-GCM / SM4-GCM file encryption."""
