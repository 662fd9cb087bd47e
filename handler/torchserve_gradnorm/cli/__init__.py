"""Command-line tools: gradnorm-archive, gradnorm-client."""
