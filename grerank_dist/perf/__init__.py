"""Performance: one training step timed by phase against the naive step (``bench``), collectives
and memory counted over launched ranks (``traffic``), both at the named shapes of ``shapes``, the
analytic cost model that predicts them and projects cluster scale (``cost_model``), and the
one-call GPU check at real shapes (``gpu_check``, run by ``scripts/gpu_check.sh``)."""
