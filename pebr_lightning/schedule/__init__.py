"""The paper's schedule as one resumable command: SFT -> sample -> perception -> reasoning."""
