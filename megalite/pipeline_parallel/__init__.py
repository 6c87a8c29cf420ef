"""megalite.pipeline_parallel"""
