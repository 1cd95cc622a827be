"""The driver's side of a run, behind the ``Trainer`` facade (``lsgd_ray/trainer.py``).

- ``base``: what every part of the driver shares (the run's actors, its clock, its history).
- ``placement``: connect to Ray, plan and check the placement.
- ``loops``: the synchronous and the asynchronous training loops, paced by one ``Schedule``.
- ``supervisor``: a coordinator or a worker's loop that died is started again.
- ``state``: checkpoint, resume, restore.
- ``records``: evaluation, progress lines, ``result.json`` and the leader's weights.
"""
