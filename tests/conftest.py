import os

from hypothesis import HealthCheck, settings

# `ci` (default) keeps `make test` in about a minute; HYPOTHESIS_PROFILE=thorough draws 500 examples per test
settings.register_profile("ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
