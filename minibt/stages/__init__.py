"""The method's stages: plain functions over files in the run directory (see minibt/pipeline.py)."""
