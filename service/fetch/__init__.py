"""Fetching images for strangers: the download client and the address policy (SSRF)."""
