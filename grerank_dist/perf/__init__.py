"""Performance: one training step timed by phase against the naive step (``bench``), collectives
and memory counted over launched ranks (``traffic``), both at the named shapes of ``shapes``, and
the analytic cost model that predicts them and projects cluster scale (``cost_model``)."""
