"""Readers, name maps and streaming writers: the conversion jobs (diffusers -> SD, SD <-> MindSpore)."""
