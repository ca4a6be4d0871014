"""Checkpoint loading and export: diffusers folders, Hub ids, single files."""
