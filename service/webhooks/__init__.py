"""Completion webhooks: signing (`signing`) and delivery with retries (`sender`)."""
