"""megalite.model"""
