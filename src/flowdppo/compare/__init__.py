"""`flowdppo compare`: methods side by side on small offline benchmarks."""
