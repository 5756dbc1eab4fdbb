"""Console entry points: spqr-run, spqr-chat, spqr-serve, spqr-eval, spqr-quantize, spqr-bench."""
