"""moebench: benchmark and compare Mixture-of-Experts implementations on one shared model spec."""
__version__ = "0.1.0"
