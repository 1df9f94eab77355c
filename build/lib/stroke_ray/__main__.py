"""``python -m stroke_ray``: the same commands as the ``stroke-ray`` console script."""

from stroke_ray.cli import app

app(prog_name="stroke-ray")
