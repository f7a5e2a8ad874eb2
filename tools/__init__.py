"""Long-running reliability drivers (fuzz, chaos, load); tests/reliability runs them briefly."""
