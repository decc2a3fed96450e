"""The "not a chest X-ray" refusal: to be rebuilt on its own detector (issue #14).

The Mahalanobis check that lived here answered a different question ("is it like the X-rays the
model was validated on?") and moved to chestxray.model.population as PopulationCheck, which never
refuses. NOT_A_CHEST_XRAY stays the error code of the refusal the new detector will give.
"""
from __future__ import annotations

NOT_A_CHEST_XRAY = "not_a_chest_xray"  # the 422 error code (and the monitoring counter's name)
