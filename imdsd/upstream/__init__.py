"""Talking to IMDS: request budget, retry policy, api-versions (sans-IO) and the client shell."""
