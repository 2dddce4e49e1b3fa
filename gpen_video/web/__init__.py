"""``gpen-video web``: a page to preview and restore faces without a terminal.

::

    access.py    who may reach the page (host, passwords) and how large an upload may be
    media.py     the server folder the page may pick inputs from (``--media-dir``)
    analysis.py  the quick look before a restore: one entry per track, frames to preview
    jobs.py      the job store (one folder per job) and the worker that runs one job at a time
    app.py       the Gradio page and ``serve``

Only ``app.py`` imports Gradio, so the command line checks its options (and says what to
install when Gradio is missing) before anything heavy is loaded.
"""
