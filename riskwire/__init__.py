"""riskwire package."""
