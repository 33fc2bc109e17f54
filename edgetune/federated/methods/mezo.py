"""MeZO (Malladi et al., NeurIPS 2023) as a centralized baseline: one client holding all the
data, zeroth-order steps (edgetune/federated/zo.py), the same seed-scalar bookkeeping as JOB."""

from edgetune.federated.methods.job import JOB


class MeZO(JOB):
    """JOB on one client holding all the data (its registry family: centralized)."""
