"""collapse-tui: watch a language model collapse as it trains on its own output.

A reproduction of Herel & Mikolov, "Collapse of Self-trained Language Models"
(arXiv 2404.02305). The engine (``collapse_tui.engine``) knows nothing of any
user interface; the TUI (``collapse_tui.tui``) and the headless runner
(``collapse_tui.headless``) are thin front ends over it and over the run-folder
writer (``collapse_tui.runfolder``).
"""

__version__ = "0.1.0"
