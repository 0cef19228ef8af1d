"""Finding and loading base models; reading their structure."""
