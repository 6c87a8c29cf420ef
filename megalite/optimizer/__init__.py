"""megalite.optimizer"""
