"""The job layer: a file in, a file out, resumable, here or on Ray workers.

``opening`` reads what a job needs of its input once (``JobPlan``); ``run`` is the one engine
(retries, replay, report, progress, assembly) behind which ``local`` and ``cluster`` render
segment tasks; ``segments`` lays segments out and joins them; ``manifest``, ``workfolder`` and
``logs`` keep a job's state on disk; ``api`` gives the public ``FacePipeline``. See
docs/architecture.md for the layers.
"""
