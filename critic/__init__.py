"""Tier 2, the constitutional critic and reviser: not built yet.

Until it is, the gateway answers an escalated prompt with its policy's
`fallback_decision` and marks the verdict `fallback_applied`.
"""
