"""megalite.distributed"""
