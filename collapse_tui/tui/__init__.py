"""The live Textual front end: ``run_app(source)`` shows and steers a run (see app.py)."""
